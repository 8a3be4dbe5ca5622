//go:build integration

// The Go client against running Fresco services, started by tests/clients/test_go_client.py (real
// processes on loopback, auth on, reads included): it passes their addresses, a token and the answers the
// Python client got for the same calls in FRESCO_IT_* variables. Run with `go test -tags integration`.
package fresco_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fresco-ml/fresco/clients/go/assignment"
	"github.com/fresco-ml/fresco/clients/go/fresco"
	commonv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/common/v1"
	experimentsv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/experiments/v1"
	gatewayv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/gateway/v1"
	"github.com/fresco-ml/fresco/clients/go/gen/inference"
)

// expectations are what the Python test knows: the rows it sent and the answers it got.
type expectations struct {
	Model         string               `json:"model"`
	ModelVersion  string               `json:"model_version"`
	Input         string               `json:"input"`
	FeatureNames  []string             `json:"feature_names"`
	Rows          [][]float64          `json:"rows"`
	Labels        []int64              `json:"labels"`
	Probabilities [][]float64          `json:"probabilities"`
	BatchLabels   []int64              `json:"batch_labels"`
	BatchProbs    [][]float64          `json:"batch_probabilities"`
	UserIDs       []int64              `json:"user_ids"`
	FeatureRefs   []string             `json:"feature_refs"`
	FeatureValues map[string][]float64 `json:"feature_values"`
	Experiment    string               `json:"experiment"`
	UnitType      string               `json:"unit_type"`
	Units         []string             `json:"units"`
	Reasons       []string             `json:"reasons"`
	Arms          []string             `json:"arms"`
}

func env(t *testing.T, name string) string {
	t.Helper()
	value := os.Getenv(name)
	if value == "" {
		t.Fatalf("%s is not set: run this test through tests/clients/test_go_client.py", name)
	}
	return value
}

func load(t *testing.T) expectations {
	t.Helper()
	data, err := os.ReadFile(env(t, "FRESCO_IT_EXPECTED"))
	if err != nil {
		t.Fatal(err)
	}
	var e expectations
	if err := json.Unmarshal(data, &e); err != nil {
		t.Fatal(err)
	}
	return e
}

func connect(t *testing.T, addressVar string, cfg fresco.Config) *fresco.Conn {
	t.Helper()
	conn, err := fresco.Dial(env(t, addressVar), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func token(t *testing.T) fresco.Config {
	return fresco.Config{Token: env(t, "FRESCO_IT_TOKEN")}
}

func row(e expectations, i int) map[string]any {
	features := make(map[string]any, len(e.FeatureNames))
	for j, name := range e.FeatureNames {
		features[name] = e.Rows[i][j]
	}
	return features
}

// outputs checks an answer's tensors and returns its label and probabilities.
func outputs(t *testing.T, r *gatewayv1.PredictResponse) (int64, []float64) {
	t.Helper()
	label, err := fresco.Int64s(r.GetOutputs()["label"])
	if err != nil || len(label) != 1 {
		t.Fatalf("label: %v %v", label, err)
	}
	probabilities, err := fresco.Float64s(r.GetOutputs()["probabilities"])
	if err != nil {
		t.Fatalf("probabilities: %v", err)
	}
	return label[0], probabilities
}

func sameFloats(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestIntegrationPredictEqualsThePythonClientAndCarriesTheTrace(t *testing.T) {
	e := load(t)
	gateway := fresco.NewGateway(connect(t, "FRESCO_IT_GATEWAY", token(t)))
	for i := range e.Rows {
		traceID := trace.TraceID{0x0f, 0x4e, byte(i), 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}
		span := trace.NewSpanContext(trace.SpanContextConfig{
			TraceID: traceID, SpanID: trace.SpanID{1, 2, 3, 4, 5, 6, 7, byte(i + 1)}, TraceFlags: trace.FlagsSampled,
		})
		ctx, cancel := context.WithTimeout(trace.ContextWithSpanContext(context.Background(), span), 20*time.Second)
		req, err := fresco.NewPredictRequest(e.Model, row(e, i))
		if err != nil {
			t.Fatal(err)
		}
		req.RequestId = fmt.Sprintf("go-%d", i)
		resp, err := gateway.Predict(ctx, req)
		cancel()
		if err != nil {
			t.Fatalf("row %d: %v", i, err)
		}
		label, probabilities := outputs(t, resp)
		if label != e.Labels[i] || !sameFloats(probabilities, e.Probabilities[i]) {
			t.Errorf("row %d: got label %d, probabilities %v; the Python client got %d, %v",
				i, label, probabilities, e.Labels[i], e.Probabilities[i])
		}
		if resp.GetModelVersion() != e.ModelVersion || resp.GetRequestId() != req.RequestId {
			t.Errorf("row %d: model version %q, request id %q", i, resp.GetModelVersion(), resp.GetRequestId())
		}
		// The gateway answers with the trace id of the span it continued: the one this client sent.
		if resp.GetTraceId() != traceID.String() {
			t.Errorf("row %d: trace id %q, want the caller's %q", i, resp.GetTraceId(), traceID.String())
		}
	}
}

func TestIntegrationPredictBatchEqualsThePythonClient(t *testing.T) {
	e := load(t)
	gateway := fresco.NewGateway(connect(t, "FRESCO_IT_GATEWAY", token(t)))
	requests := make([]*gatewayv1.PredictRequest, len(e.Rows))
	for i := range e.Rows {
		req, err := fresco.NewPredictRequest(e.Model, row(e, i))
		if err != nil {
			t.Fatal(err)
		}
		requests[i] = req
	}
	responses, err := gateway.PredictBatch(context.Background(), requests)
	if err != nil {
		t.Fatal(err)
	}
	if len(responses) != len(e.Rows) {
		t.Fatalf("%d answers for %d requests", len(responses), len(e.Rows))
	}
	for i, resp := range responses {
		label, probabilities := outputs(t, resp)
		if label != e.BatchLabels[i] || !sameFloats(probabilities, e.BatchProbs[i]) {
			t.Errorf("row %d: got label %d, probabilities %v; the Python client got %d, %v",
				i, label, probabilities, e.BatchLabels[i], e.BatchProbs[i])
		}
	}
}

func TestIntegrationModelInferOnThePredictor(t *testing.T) {
	e := load(t)
	predictor := inference.NewGRPCInferenceServiceClient(connect(t, "FRESCO_IT_PREDICTOR", token(t)).ClientConn())
	raw := make([]byte, 0, 4*len(e.Rows)*len(e.FeatureNames))
	for _, r := range e.Rows {
		for _, v := range r {
			raw = binary.LittleEndian.AppendUint32(raw, math.Float32bits(float32(v)))
		}
	}
	resp, err := predictor.ModelInfer(context.Background(), &inference.ModelInferRequest{
		ModelName: e.Model,
		Inputs: []*inference.ModelInferRequest_InferInputTensor{
			{Name: e.Input, Datatype: "FP32", Shape: []int64{int64(len(e.Rows)), int64(len(e.FeatureNames))}},
		},
		RawInputContents: [][]byte{raw},
	})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetModelVersion() != e.ModelVersion || len(resp.GetRawOutputContents()) != len(resp.GetOutputs()) {
		t.Fatalf("version %q, %d raw contents for %d outputs", resp.GetModelVersion(),
			len(resp.GetRawOutputContents()), len(resp.GetOutputs()))
	}
	for k, out := range resp.GetOutputs() {
		data := resp.GetRawOutputContents()[k]
		switch out.GetName() {
		case "label":
			for i := range e.Rows {
				if got := int64(binary.LittleEndian.Uint64(data[8*i:])); got != e.BatchLabels[i] {
					t.Errorf("row %d: label %d, the gateway gave the Python client %d", i, got, e.BatchLabels[i])
				}
			}
		case "probabilities":
			classes := len(e.BatchProbs[0])
			for i := range e.Rows {
				for c := 0; c < classes; c++ {
					got := float64(math.Float32frombits(binary.LittleEndian.Uint32(data[4*(i*classes+c):])))
					if want := e.BatchProbs[i][c]; math.Abs(got-want) > 1e-6+1e-5*math.Abs(want) {
						t.Errorf("row %d class %d: probability %v, the gateway gave the Python client %v", i, c, got, want)
					}
				}
			}
		default:
			t.Errorf("unexpected output %q", out.GetName())
		}
	}
}

func TestIntegrationGetFeaturesReadsWhatWasPushed(t *testing.T) {
	e := load(t)
	features := fresco.NewFeatures(connect(t, "FRESCO_IT_FEATURE_SERVICE", token(t)))
	entities := make([]*commonv1.EntityKey, len(e.UserIDs))
	for i, id := range e.UserIDs {
		key, err := fresco.EntityKey(map[string]any{"user_id": id})
		if err != nil {
			t.Fatal(err)
		}
		entities[i] = key
	}
	resp, err := features.GetFeatures(context.Background(), entities, e.FeatureRefs)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetColumns()) != len(e.FeatureRefs) {
		t.Fatalf("%d columns for %d refs", len(resp.GetColumns()), len(e.FeatureRefs))
	}
	for _, column := range resp.GetColumns() {
		want := e.FeatureValues[column.GetFeatureRef()]
		if len(column.GetValues()) != len(want) {
			t.Fatalf("%s: %d values for %d entities", column.GetFeatureRef(), len(column.GetValues()), len(want))
		}
		for i, value := range column.GetValues() {
			if got, ok := value.GetKind().(*commonv1.Value_DoubleValue); !ok || got.DoubleValue != want[i] {
				t.Errorf("%s of user %d: %v, pushed %v", column.GetFeatureRef(), e.UserIDs[i], value, want[i])
			}
		}
	}
}

// mtls is the experiment service's connection as FRESCO_TOKEN_FILE and FRESCO_TLS_* describe it: a
// viewer's token, the test CA and a client certificate (the service requires one).
func mtls(t *testing.T) fresco.Config {
	t.Helper()
	env(t, "FRESCO_TLS_CERT_FILE")
	cfg, err := fresco.ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestIntegrationAssignOverMTLSEqualsTheServiceAndTheHash(t *testing.T) {
	e := load(t)
	conn := connect(t, "FRESCO_IT_EXPERIMENT_SERVICE", mtls(t))
	units := make([]*experimentsv1.AssignmentUnit, len(e.Units))
	for i, unit := range e.Units {
		units[i] = &experimentsv1.AssignmentUnit{UnitIds: map[string]string{e.UnitType: unit}}
	}
	resp, err := fresco.NewExperiments(conn).Assign(context.Background(), units, e.Experiment)
	if err != nil {
		t.Fatal(err)
	}

	// The experiment as the service holds it, read through the generated stub on the same connection.
	got, err := experimentsv1.NewExperimentServiceClient(conn.ClientConn()).GetExperiment(context.Background(),
		&experimentsv1.GetExperimentRequest{Key: e.Experiment})
	if err != nil {
		t.Fatal(err)
	}
	experiment := got.GetExperiment()
	salt := experiment.GetSalt()
	if salt == "" {
		salt = experiment.GetKey()
	}
	weights := make([]float64, len(experiment.GetArms()))
	for i, arm := range experiment.GetArms() {
		weights[i] = arm.GetWeight()
	}
	placement, err := assignment.NewPlacement(assignment.PlacementSpec{
		Salt: salt, Weights: weights, Coverage: experiment.GetCoverage(),
	})
	if err != nil {
		t.Fatal(err)
	}

	if len(resp.GetUnits()) != len(e.Units) {
		t.Fatalf("%d answers for %d units", len(resp.GetUnits()), len(e.Units))
	}
	seen := map[string]int{}
	for i, unit := range resp.GetUnits() {
		if len(unit.GetAssignments()) != 1 {
			t.Fatalf("unit %q: %d assignments, want 1", e.Units[i], len(unit.GetAssignments()))
		}
		a := unit.GetAssignments()[0]
		if a.GetReason().String() != e.Reasons[i] || a.GetArmName() != e.Arms[i] {
			t.Errorf("unit %q: %s %q; the Python client got %s %q", e.Units[i], a.GetReason(), a.GetArmName(),
				e.Reasons[i], e.Arms[i])
		}
		index, in := placement.Arm(e.Units[i])
		hashed := ""
		if in {
			hashed = experiment.GetArms()[index].GetName()
		}
		if hashed != a.GetArmName() {
			t.Errorf("unit %q: the Go hash places it in %q, the service in %q", e.Units[i], hashed, a.GetArmName())
		}
		seen[a.GetReason().String()]++
	}
	// Units both in and out of the coverage, so neither side can pass by answering one way.
	if seen["ASSIGNMENT_REASON_ASSIGNED"] == 0 || seen["ASSIGNMENT_REASON_OUTSIDE_COVERAGE"] == 0 {
		t.Errorf("reasons %v: expected units both assigned and outside the coverage", seen)
	}
}

func TestIntegrationTLSWithoutAClientCertificateIsRefused(t *testing.T) {
	e := load(t)
	withCert := mtls(t)
	withoutCert := fresco.Config{Token: withCert.Token, TLS: withCert.TLS.Clone()}
	withoutCert.TLS.Certificates = nil
	units := []*experimentsv1.AssignmentUnit{{UnitIds: map[string]string{e.UnitType: e.Units[0]}}}
	experiments := fresco.NewExperiments(connect(t, "FRESCO_IT_EXPERIMENT_SERVICE", withoutCert))
	if _, err := experiments.Assign(context.Background(), units, e.Experiment); status.Code(err) != codes.Unavailable {
		t.Errorf("without a client certificate: %v, want UNAVAILABLE (the handshake fails)", err)
	}
	plaintext := fresco.NewExperiments(connect(t, "FRESCO_IT_EXPERIMENT_SERVICE", fresco.Config{Token: withCert.Token}))
	if _, err := plaintext.Assign(context.Background(), units, e.Experiment); status.Code(err) != codes.Unavailable {
		t.Errorf("in plaintext: %v, want UNAVAILABLE", err)
	}
}

func TestIntegrationErrorsKeepTheirStatus(t *testing.T) {
	e := load(t)
	req, err := fresco.NewPredictRequest(e.Model, row(e, 0))
	if err != nil {
		t.Fatal(err)
	}

	anonymous := fresco.NewGateway(connect(t, "FRESCO_IT_GATEWAY", fresco.Config{}))
	if _, err := anonymous.Predict(context.Background(), req); status.Code(err) != codes.Unauthenticated {
		t.Errorf("without a token: %v, want UNAUTHENTICATED", err)
	}
	wrong := fresco.NewGateway(connect(t, "FRESCO_IT_GATEWAY", fresco.Config{Token: "not-a-token"}))
	if _, err := wrong.Predict(context.Background(), req); status.Code(err) != codes.Unauthenticated {
		t.Errorf("with an unknown token: %v, want UNAUTHENTICATED", err)
	}

	gateway := fresco.NewGateway(connect(t, "FRESCO_IT_GATEWAY", token(t)))
	unknown, err := fresco.NewPredictRequest("no-such-model", row(e, 0))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gateway.Predict(context.Background(), unknown); status.Code(err) != codes.NotFound {
		t.Errorf("an unknown model: %v, want NOT_FOUND", err)
	}
	badRow := row(e, 0)
	badRow[e.FeatureNames[2]] = "4.2"
	bad, err := fresco.NewPredictRequest(e.Model, badRow)
	if err != nil {
		t.Fatal(err)
	}
	_, err = gateway.Predict(context.Background(), bad)
	if s := status.Convert(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), "'"+e.FeatureNames[2]+"'") {
		t.Errorf("a string for a double feature: %v, want INVALID_ARGUMENT naming %q", err, e.FeatureNames[2])
	}
	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	if _, err := gateway.Predict(expired, req); status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("a deadline already passed: %v, want DEADLINE_EXCEEDED", err)
	}
}
