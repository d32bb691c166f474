package bytesize

import "testing"

func TestParse(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "4096": 4096, "4096B": 4096, "512b": 512,
		"64MiB": 64 << 20, "2GiB": 2 << 30, "512MiB": 512 << 20, "1TiB": 1 << 40,
		"16G": 16 << 30, "1K": 1 << 10, "3MB": 3 << 20, "1.5GiB": 3 << 29,
		"1 gib": 1 << 30, " 8 KiB ": 8 << 10, "1e3": 1000, ".5K": 512, "1.9": 1,
	} {
		if got, err := Parse(in); err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{
		"", " ", "GiB", "2XB", "2PiB", "-1G", "two", "1GiBB", "NaN", "inf", "1e30", "9000000TiB",
	} {
		if got, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) = %d, want an error", in, got)
		}
	}
}
