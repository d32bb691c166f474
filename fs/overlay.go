package fs

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// maxMountData is the most mount(2) copies of its data argument (one
// page, including the terminating NUL).
var maxMountData = os.Getpagesize() - 1

// MountOverlay mounts the read-only overlayfs union of lowers at target,
// lowers[0] being the top-most layer. There is no upper directory, so the
// union cannot be written. A list too long for mount(2)'s one-page option
// string is passed one directory at a time ("lowerdir+", Linux ≥ 6.8).
//
// overlayfs needs two lowers when there is no upper directory, so a
// single lower is bind-mounted read-only instead: a bottom layer's
// whiteouts and opaque markers have nothing to hide anyway.
func MountOverlay(lowers []string, target string) error {
	switch len(lowers) {
	case 0:
		return fmt.Errorf("mount overlay at %s: no lower directories", target)
	case 1:
		return bindReadOnly(lowers[0], target)
	}
	data := lowerdirOption(lowers)
	if len(data) <= maxMountData {
		if err := unix.Mount("overlay", target, "overlay", unix.MS_RDONLY, data); err != nil {
			return fmt.Errorf("mount overlay at %s (%d lowers): %w", target, len(lowers), err)
		}
		return nil
	}
	if err := mountOverlayFsconfig(lowers, target); err != nil {
		return fmt.Errorf("mount overlay at %s (%d lowers): %w", target, len(lowers), err)
	}
	return nil
}

// bindReadOnly bind-mounts src at target read-only. A bind mount takes
// the source's flags, so read-only needs a second, remounting call.
func bindReadOnly(src, target string) error {
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s at %s: %w", src, target, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	if err := unix.Mount("", target, "", flags, ""); err != nil {
		unix.Unmount(target, unix.MNT_DETACH)
		return fmt.Errorf("make bind at %s read-only: %w", target, err)
	}
	return nil
}

// lowerdirOption is the classic "lowerdir=a:b:c" option, with the
// characters overlayfs splits on escaped.
func lowerdirOption(lowers []string) string {
	esc := strings.NewReplacer(`\`, `\\`, `:`, `\:`, `,`, `\,`)
	var b strings.Builder
	b.WriteString("lowerdir=")
	for i, l := range lowers {
		if i > 0 {
			b.WriteByte(':')
		}
		b.WriteString(esc.Replace(l))
	}
	return b.String()
}

// mountOverlayFsconfig mounts with the new mount API, which takes each
// lower directory as its own parameter, verbatim.
func mountOverlayFsconfig(lowers []string, target string) (err error) {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("fsopen: %w", err)
	}
	defer unix.Close(fsfd)
	// On failure the kernel leaves its reason in the context's log.
	defer func() {
		if err != nil {
			if msg := fsLog(fsfd); msg != "" {
				err = fmt.Errorf("%w (%s)", err, msg)
			}
		}
	}()
	for _, l := range lowers {
		if err := unix.FsconfigSetString(fsfd, "lowerdir+", l); err != nil {
			return fmt.Errorf("fsconfig lowerdir+ %s: %w", l, err)
		}
	}
	if err := unix.FsconfigSetFlag(fsfd, "ro"); err != nil {
		return fmt.Errorf("fsconfig ro: %w", err)
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return fmt.Errorf("fsconfig create: %w", err)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_RDONLY)
	if err != nil {
		return fmt.Errorf("fsmount: %w", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount: %w", err)
	}
	return nil
}

// fsLog drains the messages the kernel logged on a file system context.
func fsLog(fsfd int) string {
	var msgs []string
	buf := make([]byte, 1024)
	for {
		n, err := unix.Read(fsfd, buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	return strings.Join(msgs, "; ")
}

// UnmountOverlay unmounts an overlay mounted by MountOverlay, detaching it
// lazily if it is busy. A target that is not mounted is not an error.
func UnmountOverlay(target string) error {
	return unmountOrDetach(target, 0)
}
