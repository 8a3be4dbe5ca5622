package assignment

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The committed test vectors of the specification, written by scripts/make-assignment-vectors.
var vectorsPath = filepath.Join("..", "..", "..", "fresco", "experiments", "assignment_vectors.json")

type vectors struct {
	SpecVersion int    `json:"spec_version"`
	About       string `json:"about"`
	FNV1a32     []struct {
		Input string `json:"input"`
		Hash  uint32 `json:"fnv1a32"`
	} `json:"fnv1a32"`
	Buckets []struct {
		Seed   string `json:"seed"`
		Unit   string `json:"unit"`
		Bucket int    `json:"bucket"`
	} `json:"buckets"`
	Placements []struct {
		Salt           string    `json:"salt"`
		Weights        []float64 `json:"weights"`
		Coverage       float64   `json:"coverage"`
		Namespace      string    `json:"namespace"`
		NamespaceRange [2]int    `json:"namespace_range"`
		Unit           string    `json:"unit"`
		Arm            *int      `json:"arm"`
	} `json:"placements"`
}

func loadVectors(t *testing.T) vectors {
	t.Helper()
	data, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatalf("reading the test vectors: %v", err)
	}
	var v vectors
	decoder := json.NewDecoder(strings.NewReader(string(data)))
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(&v); err != nil {
		t.Fatalf("decoding %s: %v", vectorsPath, err)
	}
	return v
}

func TestVectorsAreThisSpecVersion(t *testing.T) {
	v := loadVectors(t)
	if v.SpecVersion != SpecVersion {
		t.Fatalf("vectors are spec version %d, this package implements %d", v.SpecVersion, SpecVersion)
	}
	if len(v.FNV1a32) == 0 || len(v.Buckets) == 0 || len(v.Placements) == 0 {
		t.Fatalf("expected vectors of every kind, got %d FNV-1a, %d bucket, %d placement",
			len(v.FNV1a32), len(v.Buckets), len(v.Placements))
	}
}

func TestFNV1a32MatchesTheVectors(t *testing.T) {
	for _, c := range loadVectors(t).FNV1a32 {
		if got := FNV1a32([]byte(c.Input)); got != c.Hash {
			t.Errorf("FNV1a32(%q) = %d, want %d", c.Input, got, c.Hash)
		}
	}
}

func TestBucketMatchesTheVectors(t *testing.T) {
	for _, c := range loadVectors(t).Buckets {
		if got := Bucket(c.Seed, c.Unit); got != c.Bucket {
			t.Errorf("Bucket(%q, %q) = %d, want %d", c.Seed, c.Unit, got, c.Bucket)
		}
	}
}

func TestPlacementMatchesTheVectors(t *testing.T) {
	inside, outside := 0, 0
	for i, c := range loadVectors(t).Placements {
		placement, err := NewPlacement(PlacementSpec{
			Salt: c.Salt, Weights: c.Weights, Coverage: c.Coverage, Namespace: c.Namespace,
			NamespaceStart: c.NamespaceRange[0], NamespaceEnd: c.NamespaceRange[1],
		})
		if err != nil {
			t.Fatalf("placement %d: %v", i, err)
		}
		arm, in := placement.Arm(c.Unit)
		switch {
		case c.Arm == nil && in:
			t.Errorf("placement %d (%+v): unit %q got arm %d, want none", i, c, c.Unit, arm)
		case c.Arm != nil && (!in || arm != *c.Arm):
			t.Errorf("placement %d (%+v): unit %q got arm %d (in=%v), want %d", i, c, c.Unit, arm, in, *c.Arm)
		}
		if c.Arm == nil {
			outside++
		} else {
			inside++
		}
	}
	// The vectors exercise both outcomes, so a Placement that always answers one way cannot pass.
	if inside == 0 || outside == 0 {
		t.Fatalf("expected placements both inside and outside, got %d inside, %d outside", inside, outside)
	}
}

func TestArmBoundsEndAtEveryBucketAndRoundHalfToEven(t *testing.T) {
	cases := []struct {
		weights []float64
		want    []int
	}{
		{[]float64{1}, []int{10000}},
		{[]float64{1, 1}, []int{5000, 10000}},
		{[]float64{0, 1}, []int{0, 10000}},
		{[]float64{1, 1, 1}, []int{3333, 6667, 10000}},
		// 10000 * 1 / 20000 = 0.5 → 0 and 10000 * 5 / 20000 = 2.5 → 2: ties go to even, as in the reference.
		{[]float64{1, 19999}, []int{0, 10000}},
		{[]float64{5, 19995}, []int{2, 10000}},
	}
	for _, c := range cases {
		got, err := ArmBounds(c.weights)
		if err != nil {
			t.Fatalf("ArmBounds(%v): %v", c.weights, err)
		}
		if len(got) != len(c.want) {
			t.Fatalf("ArmBounds(%v) = %v, want %v", c.weights, got, c.want)
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Fatalf("ArmBounds(%v) = %v, want %v", c.weights, got, c.want)
			}
		}
	}
}

func TestBadPlacementsNameTheField(t *testing.T) {
	cases := []struct {
		spec  PlacementSpec
		field string
	}{
		{PlacementSpec{Weights: []float64{1}, Coverage: 1}, "salt:"},
		{PlacementSpec{Salt: "e", Weights: []float64{1}, Coverage: 1.5}, "coverage:"},
		{PlacementSpec{Salt: "e", Weights: []float64{1}, Coverage: 1, NamespaceStart: 20, NamespaceEnd: 10}, "namespace_range:"},
		{PlacementSpec{Salt: "e", Coverage: 1}, "weights:"},
		{PlacementSpec{Salt: "e", Weights: []float64{-1, 2}, Coverage: 1}, "weights:"},
		{PlacementSpec{Salt: "e", Weights: []float64{0, 0}, Coverage: 1}, "weights:"},
	}
	for _, c := range cases {
		_, err := NewPlacement(c.spec)
		if err == nil || !strings.HasPrefix(err.Error(), c.field) {
			t.Errorf("NewPlacement(%+v) = %v, want an error naming %q", c.spec, err, c.field)
		}
	}
}
