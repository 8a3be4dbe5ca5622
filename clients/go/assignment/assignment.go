// Package assignment is Fresco's frozen assignment specification in Go: which arm of an experiment a
// unit gets, the same as the gateway and the experiment service compute it (fresco/experiments/assignment.py,
// version 1). Every implementation reproduces fresco/experiments/assignment_vectors.json.
//
// A unit's bucket for a seed is fnv1a32(decimal(fnv1a32(utf8(seed + unit)))) mod 10000 (GrowthBook's v2
// hash). Each decision hashes with its own seed: "ns:"+namespace for mutual exclusion, "cov:"+salt for
// coverage and "arm:"+salt for the arm (the salt is the experiment key unless set).
package assignment

import (
	"errors"
	"fmt"
	"math"
	"strconv"
)

// Buckets is the number of buckets a unit hashes into (0..9999).
const Buckets = 10000

// SpecVersion is the version of the specification this package implements.
const SpecVersion = 1

const (
	fnvOffset uint32 = 2166136261
	fnvPrime  uint32 = 16777619
)

// FNV1a32 is the 32-bit FNV-1a hash of data.
func FNV1a32(data []byte) uint32 {
	value := fnvOffset
	for _, b := range data {
		value = (value ^ uint32(b)) * fnvPrime
	}
	return value
}

// Bucket is the unit's bucket in 0..9999 for one seed: FNV-1a over seed+unit, written in decimal, hashed again.
func Bucket(seed, unit string) int {
	first := FNV1a32([]byte(seed + unit))
	return int(FNV1a32([]byte(strconv.FormatUint(uint64(first), 10))) % Buckets)
}

// roundHalfEven rounds as the specification's reference does (Python's round: ties to even).
func roundHalfEven(x float64) int {
	return int(math.RoundToEven(x))
}

// ArmBounds is where each arm's bucket range ends: cumulative weight over the total, rounded, the last 10000.
func ArmBounds(weights []float64) ([]int, error) {
	if len(weights) == 0 {
		return nil, errors.New("weights: expected at least one arm")
	}
	total := 0.0
	for _, w := range weights {
		if !(w >= 0) {
			return nil, fmt.Errorf("weights: expected non-negative numbers, got %v", weights)
		}
		total += w
	}
	if !(total > 0) {
		return nil, errors.New("weights: expected a positive total")
	}
	bounds := make([]int, len(weights))
	running := 0.0
	for i, w := range weights {
		running += w
		bounds[i] = roundHalfEven(Buckets * running / total)
	}
	bounds[len(bounds)-1] = Buckets
	return bounds, nil
}

// Placement is how an experiment places units: its salt, arm weights, coverage and namespace slice.
type Placement struct {
	salt           string
	bounds         []int
	coverageEnd    int
	namespace      string
	namespaceStart int
	namespaceEnd   int
}

// PlacementSpec describes a Placement. An empty Namespace places every unit in the namespace; a zero
// NamespaceEnd means the whole range [NamespaceStart, 10000).
type PlacementSpec struct {
	// Salt seeds the coverage and arm hashes: the experiment key unless the experiment sets its own.
	Salt string
	// Weights are the arms' weights in the experiment's arm order.
	Weights []float64
	// Coverage is the fraction of units that enter, in [0, 1].
	Coverage float64
	// Namespace is the mutual-exclusion namespace's id; empty for none.
	Namespace string
	// NamespaceStart and NamespaceEnd bound the experiment's slice of the namespace's buckets.
	NamespaceStart, NamespaceEnd int
}

// NewPlacement checks spec as the reference does, naming the field that is wrong.
func NewPlacement(spec PlacementSpec) (*Placement, error) {
	if spec.Salt == "" {
		return nil, errors.New("salt: expected a non-empty salt (the experiment key by default)")
	}
	if !(spec.Coverage >= 0 && spec.Coverage <= 1) {
		return nil, fmt.Errorf("coverage: expected a fraction in [0, 1], got %v", spec.Coverage)
	}
	end := spec.NamespaceEnd
	if end == 0 {
		end = Buckets
	}
	if !(0 <= spec.NamespaceStart && spec.NamespaceStart < end && end <= Buckets) {
		return nil, fmt.Errorf("namespace_range: expected 0 <= start < end <= %d, got (%d, %d)",
			Buckets, spec.NamespaceStart, spec.NamespaceEnd)
	}
	bounds, err := ArmBounds(spec.Weights)
	if err != nil {
		return nil, err
	}
	return &Placement{
		salt:           spec.Salt,
		bounds:         bounds,
		coverageEnd:    roundHalfEven(spec.Coverage * Buckets),
		namespace:      spec.Namespace,
		namespaceStart: spec.NamespaceStart,
		namespaceEnd:   end,
	}, nil
}

// Arm is the index of the unit's arm, and false when the unit is outside the namespace slice or the coverage.
func (p *Placement) Arm(unit string) (int, bool) {
	if p.namespace != "" {
		b := Bucket("ns:"+p.namespace, unit)
		if b < p.namespaceStart || b >= p.namespaceEnd {
			return 0, false
		}
	}
	if Bucket("cov:"+p.salt, unit) >= p.coverageEnd {
		return 0, false
	}
	position := Bucket("arm:"+p.salt, unit)
	for i, end := range p.bounds {
		if position < end {
			return i, true
		}
	}
	return 0, false // unreachable: the last bound is Buckets
}
