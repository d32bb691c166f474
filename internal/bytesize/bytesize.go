// Package bytesize reads the byte sizes people write in weightsnap's flags
// and environment knobs: "64MiB", "2GiB", "1.5G", "4096".
package bytesize

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// units are the multipliers Parse knows, upper-cased: K, M, G and T are
// binary, alone or followed by "B" or "iB"; "B" is bytes.
var units = map[string]float64{
	"": 1, "B": 1,
	"K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
	"M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
	"G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
	"T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40,
}

// Parse returns the number of bytes s stands for: a non-negative number,
// possibly fractional, then an optional unit (see units; case does not
// matter, spaces around the number and the unit are ignored). A fraction of
// a byte is dropped.
func Parse(s string) (int64, error) {
	num := strings.TrimSpace(s)
	unit := ""
	if i := strings.LastIndexAny(num, "0123456789."); i >= 0 {
		num, unit = num[:i+1], strings.TrimSpace(num[i+1:])
	}
	mult, ok := units[strings.ToUpper(unit)]
	v, err := strconv.ParseFloat(num, 64)
	// The comparisons are false for NaN, and ±Inf fails the second.
	if !ok || err != nil || !(v >= 0) || !(v*mult < math.MaxInt64) {
		return 0, fmt.Errorf("size %q: want a non-negative number with an optional unit (KiB, MiB, GiB, TiB)", s)
	}
	return int64(v * mult), nil
}
