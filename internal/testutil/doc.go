// Package testutil is the shared test infrastructure of weightsnap's
// integration tests: prerequisite checks, a real registry, a counting and
// fault-injecting registry proxy, fixture layers that exercise every tar
// feature in every layer format, and an independent reference extraction to
// compare a mounted file system against.
//
// Only tests may import it; production packages must not.
package testutil
