package fresco

import (
	"context"
	"fmt"

	gatewayv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/gateway/v1"
)

// Gateway calls the gateway's GatewayService: Fresco's front door for predictions.
type Gateway struct {
	stub gatewayv1.GatewayServiceClient
}

// NewGateway is a gateway client over conn.
func NewGateway(conn *Conn) *Gateway {
	return &Gateway{stub: gatewayv1.NewGatewayServiceClient(conn.cc)}
}

// NewPredictRequest is a PredictRequest for one row of named features (converted with ValueOf), served by
// the version routing and experiments choose; set the request's other fields (Version, UnitIds, EntityKeys,
// Attributes, RequestId, Outputs) as needed.
func NewPredictRequest(model string, features map[string]any) (*gatewayv1.PredictRequest, error) {
	values, err := Values(features)
	if err != nil {
		return nil, fmt.Errorf("features.%w", err)
	}
	return &gatewayv1.PredictRequest{Model: model, Features: values}, nil
}

// Predict answers one prediction.
func (g *Gateway) Predict(ctx context.Context, req *gatewayv1.PredictRequest) (*gatewayv1.PredictResponse, error) {
	return g.stub.Predict(ctx, req)
}

// PredictBatch answers many predictions in one call, in request order (the gateway batches rows per
// model version; its max_batch_requests bounds how many).
func (g *Gateway) PredictBatch(ctx context.Context, reqs []*gatewayv1.PredictRequest) ([]*gatewayv1.PredictResponse, error) {
	resp, err := g.stub.PredictBatch(ctx, &gatewayv1.PredictBatchRequest{Requests: reqs})
	if err != nil {
		return nil, err
	}
	return resp.GetResponses(), nil
}
