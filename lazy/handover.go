package lazy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/opencontainers/go-digest"

	"github.com/weightsnap/weightsnap/fs"
	"github.com/weightsnap/weightsnap/metrics"
)

// The connections of the mounts outlive this process (WithHolder): each
// mount's is put in the holder with what a successor needs to serve it
// again, and dropped when the layer is unmounted. A successor lists them
// and calls Resume for each.

// heldMount is what the holder keeps beside a mount's connection.
type heldMount struct {
	// Proto is the serving protocol the connection was set up for:
	// fs's mount options (the kernel keeps what was agreed at INIT), its
	// node IDs, handles and open table. A successor serves only its own.
	Proto int           `json:"proto"`
	Image string        `json:"image"` // pinned by digest: its record is in the cache
	Layer digest.Digest `json:"layer"`
	Init  []byte        `json:"init"` // the kernel's INIT request (fs.Conn)
}

// heldProto is this version's Proto: change it with anything a resumed
// connection depends on (fs.mountOptions, node IDs, handles, the open
// table's format).
const heldProto = 1

// openTable is where the open table of the mount at mountpoint is kept;
// "" without a holder.
func (m *Manager) openTable(mountpoint string) string {
	if m.opt.holder == nil || m.opt.stateDir == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(mountpoint))
	return filepath.Join(m.opt.stateDir, "opens-"+hex.EncodeToString(sum[:16])+".json")
}

// hold hands the connection of the mount at mountpoint to the holder. A
// failure leaves the mount served, but only by this process.
func (m *Manager) hold(mountpoint string, sl *sharedLayer, mnt mount) {
	if m.opt.holder == nil {
		return
	}
	err := func() error {
		c, err := mnt.Conn()
		if err != nil {
			return err
		}
		defer c.Close()
		meta, err := json.Marshal(heldMount{Proto: heldProto, Image: sl.image, Layer: sl.desc.Digest, Init: c.Init})
		if err != nil {
			return err
		}
		return m.opt.holder.Put(mountpoint, meta, c.File)
	}()
	if err != nil {
		metrics.HolderErrors.Inc()
		slog.Warn("the mount will not survive this process", "mountpoint", mountpoint, "layer", sl.desc.Digest, "err", err)
	}
}

// unhold has the holder let go of the connection of a mount that is
// unmounted.
func (m *Manager) unhold(mountpoint string) {
	if m.opt.holder == nil {
		return
	}
	if err := m.opt.holder.Drop(mountpoint); err != nil {
		metrics.HolderErrors.Inc()
		slog.Warn("the holder keeps the connection of an unmounted layer", "mountpoint", mountpoint, "err", err)
	}
}

// Resume serves again the mount at mountpoint whose connection c a former
// process handed to the holder with meta, and takes c.File. Reads waiting
// on the mount go on. The layer is opened from the cache's records without
// the registry: a registry that is down or refuses the credentials this
// process has fails only the reads of bytes the cache lacks (EIO, the
// registry's answer in the log). On an error nothing is served: the caller
// ends the connection (fs.CleanupMount), so that its readers fail rather
// than wait.
func (m *Manager) Resume(ctx context.Context, mountpoint string, meta []byte, c fs.Conn) error {
	mountpoint = filepath.Clean(mountpoint)
	var hm heldMount
	if err := json.Unmarshal(meta, &hm); err != nil {
		c.Close()
		return fmt.Errorf("resume %s: %w", mountpoint, err)
	}
	if hm.Proto != heldProto {
		c.Close()
		return fmt.Errorf("resume layer %s of %s: its connection was set up by a weightsnap of another protocol (%d, this one serves %d)", hm.Layer, hm.Image, hm.Proto, heldProto)
	}
	c.Init = hm.Init
	ctx, done, err := m.begin(ctx)
	if err != nil {
		c.Close()
		return fmt.Errorf("resume layer %s of %s: %w", hm.Layer, hm.Image, err)
	}
	defer done()
	dl, err := m.describe(ctx, hm.Image, hm.Layer)
	if err != nil {
		c.Close()
		return fmt.Errorf("resume layer %s of %s: %w", hm.Layer, hm.Image, err)
	}
	dl.opened = true
	ref, err := m.acquire(ctx, dl)
	if err != nil {
		c.Close()
		return fmt.Errorf("resume layer %s of %s: %w", hm.Layer, hm.Image, err)
	}
	sl := ref.Value()
	mnt, err := m.resume(ctx, sl.l, mountpoint, c, m.fsOptions(sl, mountpoint)...)
	if err != nil && mnt == nil {
		ref.Release()
		c.Close()
		return fmt.Errorf("resume layer %s of %s: %w", hm.Layer, hm.Image, err)
	}
	if err != nil { // served, but readers waiting on a lost request wait on
		slog.Warn("resumed with requests in flight lost", "mountpoint", mountpoint, "err", err)
	}
	if err := m.register(ctx, mountpoint, &layerMount{ref: ref, mount: mnt}); err != nil {
		m.releaseWhenDone(ref, mnt)
		return err
	}
	sl.mountedOnce.Do(func() { close(sl.mounted) })
	slog.Info("resumed a mount", "mountpoint", mountpoint, "layer", hm.Layer, "image", hm.Image)
	return nil
}
