package fresco

import (
	"context"

	commonv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/common/v1"
	featuresv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/features/v1"
)

// Features calls the feature service's FeatureService.
type Features struct {
	stub featuresv1.FeatureServiceClient
}

// NewFeatures is a feature service client over conn.
func NewFeatures(conn *Conn) *Features {
	return &Features{stub: featuresv1.NewFeatureServiceClient(conn.cc)}
}

// GetFeatures reads feature refs ("view:feature", possibly of several views) for a batch of entities in one
// call: one column per ref, each with one value and status per entity in request order.
func (f *Features) GetFeatures(ctx context.Context, entities []*commonv1.EntityKey, refs []string) (*featuresv1.GetFeaturesResponse, error) {
	return f.Get(ctx, &featuresv1.GetFeaturesRequest{EntityKeys: entities, FeatureRefs: refs})
}

// Get sends a GetFeaturesRequest built by the caller (event timestamps, max staleness, raw values).
func (f *Features) Get(ctx context.Context, req *featuresv1.GetFeaturesRequest) (*featuresv1.GetFeaturesResponse, error) {
	return f.stub.GetFeatures(ctx, req)
}
