package fresco

import (
	"context"

	experimentsv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/experiments/v1"
)

// Experiments calls the experiment service's ExperimentService.
type Experiments struct {
	stub experimentsv1.ExperimentServiceClient
}

// NewExperiments is an experiment service client over conn.
func NewExperiments(conn *Conn) *Experiments {
	return &Experiments{stub: experimentsv1.NewExperimentServiceClient(conn.cc)}
}

// Assign places each unit (its ids by unit type, and the attributes targeting tests) in the running
// experiments, optionally only those listed in experimentKeys; one UnitAssignments per unit, in order.
// The arms come from the frozen hash the assignment package implements.
func (e *Experiments) Assign(ctx context.Context, units []*experimentsv1.AssignmentUnit, experimentKeys ...string) (*experimentsv1.AssignResponse, error) {
	return e.stub.Assign(ctx, &experimentsv1.AssignRequest{Units: units, ExperimentKeys: experimentKeys})
}
