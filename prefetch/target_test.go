package prefetch_test

import (
	"github.com/weightsnap/weightsnap/cache"
	"github.com/weightsnap/weightsnap/prefetch"
)

// The node cache's blobs are what the scheduler drives in production.
var _ prefetch.Target = (*cache.Blob)(nil)
