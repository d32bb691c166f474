package testutil

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// missing skips t because a prerequisite is unavailable, or fails it when
// CI=true: on CI a skipped integration test would silently hide a broken
// environment.
func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("prerequisite missing (CI=true, not skipping): "+format, args...)
		return
	}
	t.Skipf("prerequisite missing: "+format, args...)
}

// RequireRoot skips the test (fails it when CI=true) unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if euid := os.Geteuid(); euid != 0 {
		missing(t, "test needs root (euid is %d)", euid)
	}
}

// RequireFUSE skips the test (fails it when CI=true) unless it runs as root
// and /dev/fuse can be opened, which is what a FUSE mount needs.
func RequireFUSE(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		missing(t, "test needs FUSE: %v", err)
		return
	}
	f.Close()
}

// RequireBinary returns the path of the executable name, looked up first in
// the repository's ".bin" directory (where pinned tools such as containerd
// are built) and then in PATH. It skips the test (fails it when CI=true) if
// neither has it.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	if root, err := RepoRoot(); err == nil {
		p := filepath.Join(root, ".bin", name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		missing(t, "binary %q is not in the repository's .bin directory nor in PATH", name)
		return ""
	}
	return p
}

// RepoRoot returns the directory holding go.mod, found by walking up from
// the working directory (a package directory while tests run).
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// SkipOrFail skips t because a prerequisite (a kernel feature, say) is
// missing, or fails it when CI=true.
func SkipOrFail(t testing.TB, why string) {
	t.Helper()
	missing(t, "%s", why)
}
