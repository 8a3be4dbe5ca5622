package fresco

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	featuresv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/features/v1"
	gatewayv1 "github.com/fresco-ml/fresco/clients/go/gen/fresco/gateway/v1"
)

// recorder is a real gRPC server on loopback that keeps what each Predict call brought on the wire (its
// metadata and whether it had a deadline) and answers with the status the test chose.
type recorder struct {
	gatewayv1.UnimplementedGatewayServiceServer
	mu        sync.Mutex
	metadata  []metadata.MD
	deadlines []time.Time
	fail      error
}

func (r *recorder) Predict(ctx context.Context, req *gatewayv1.PredictRequest) (*gatewayv1.PredictResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	deadline, _ := ctx.Deadline()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.metadata = append(r.metadata, md)
	r.deadlines = append(r.deadlines, deadline)
	if r.fail != nil {
		return nil, r.fail
	}
	return &gatewayv1.PredictResponse{Model: req.GetModel()}, nil
}

// features records a PushFeatures stream's metadata, the one client stream the tests open.
type features struct {
	featuresv1.UnimplementedFeatureServiceServer
	rec *recorder
}

func (f features) PushFeatures(stream grpc.ClientStreamingServer[featuresv1.PushFeaturesRequest, featuresv1.PushFeaturesResponse]) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	deadline, _ := stream.Context().Deadline()
	f.rec.mu.Lock()
	f.rec.metadata = append(f.rec.metadata, md)
	f.rec.deadlines = append(f.rec.deadlines, deadline)
	f.rec.mu.Unlock()
	return stream.SendAndClose(&featuresv1.PushFeaturesResponse{})
}

func (r *recorder) last() (metadata.MD, time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.metadata[len(r.metadata)-1], r.deadlines[len(r.deadlines)-1]
}

func serve(t *testing.T) (*recorder, string) {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	rec := &recorder{}
	gatewayv1.RegisterGatewayServiceServer(server, rec)
	featuresv1.RegisterFeatureServiceServer(server, features{rec: rec})
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	return rec, listener.Addr().String()
}

func dial(t *testing.T, address string, cfg Config) *Gateway {
	t.Helper()
	conn, err := Dial(address, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return NewGateway(conn)
}

func TestTokenTraceContextAndDefaultDeadlineReachTheServer(t *testing.T) {
	rec, address := serve(t)
	gateway := dial(t, address, Config{Token: "s3cret"})
	traceID, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	spanID, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	span := trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID, SpanID: spanID, TraceFlags: trace.FlagsSampled})
	ctx := trace.ContextWithSpanContext(context.Background(), span)

	if _, err := gateway.Predict(ctx, &gatewayv1.PredictRequest{Model: "demo"}); err != nil {
		t.Fatal(err)
	}
	md, deadline := rec.last()
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer s3cret" {
		t.Errorf("authorization = %q, want one \"Bearer s3cret\"", got)
	}
	if got := md.Get("traceparent"); len(got) != 1 || got[0] != "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" {
		t.Errorf("traceparent = %q, want the span's", got)
	}
	if deadline.IsZero() {
		t.Error("a call without a deadline reached the server without one: DefaultTimeout was not applied")
	}
}

func TestStreamsCarryTheTokenAndTraceContextButNoDefaultDeadline(t *testing.T) {
	rec, address := serve(t)
	conn, err := Dial(address, Config{Token: "s3cret"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	traceID, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	spanID, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	span := trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID, SpanID: spanID, TraceFlags: trace.FlagsSampled})
	stream, err := featuresv1.NewFeatureServiceClient(conn.ClientConn()).PushFeatures(
		trace.ContextWithSpanContext(context.Background(), span))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	md, deadline := rec.last()
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer s3cret" {
		t.Errorf("authorization = %q, want one \"Bearer s3cret\"", got)
	}
	if got := md.Get("traceparent"); len(got) != 1 || got[0] != "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" {
		t.Errorf("traceparent = %q, want the span's", got)
	}
	if !deadline.IsZero() {
		t.Errorf("a stream got deadline %v: a long-lived stream must not inherit the unary default", deadline)
	}
}

func TestTheCallersDeadlineIsKept(t *testing.T) {
	rec, address := serve(t)
	gateway := dial(t, address, Config{Timeout: time.Hour})
	deadline := time.Now().Add(time.Minute)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	if _, err := gateway.Predict(ctx, &gatewayv1.PredictRequest{Model: "demo"}); err != nil {
		t.Fatal(err)
	}
	_, got := rec.last()
	// The server sees the caller's minute (give or take the time in flight), not the client's default hour.
	if got.IsZero() || got.After(deadline.Add(30*time.Minute)) {
		t.Errorf("server deadline %v, want the caller's %v rather than the client's default hour", got, deadline)
	}
}

func TestNoTokenNoSpanSendNeither(t *testing.T) {
	rec, address := serve(t)
	gateway := dial(t, address, Config{})
	if _, err := gateway.Predict(context.Background(), &gatewayv1.PredictRequest{Model: "demo"}); err != nil {
		t.Fatal(err)
	}
	md, _ := rec.last()
	if got := md.Get("authorization"); len(got) != 0 {
		t.Errorf("authorization = %q, want none", got)
	}
	if got := md.Get("traceparent"); len(got) != 0 {
		t.Errorf("traceparent = %q, want none without a span", got)
	}
}

func TestACallersOwnTraceparentIsNotDoubled(t *testing.T) {
	rec, address := serve(t)
	gateway := dial(t, address, Config{})
	own := "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	traceID, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	spanID, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	span := trace.NewSpanContext(trace.SpanContextConfig{TraceID: traceID, SpanID: spanID})
	ctx := metadata.AppendToOutgoingContext(trace.ContextWithSpanContext(context.Background(), span), "traceparent", own)
	if _, err := gateway.Predict(ctx, &gatewayv1.PredictRequest{Model: "demo"}); err != nil {
		t.Fatal(err)
	}
	md, _ := rec.last()
	if got := md.Get("traceparent"); len(got) != 1 || got[0] != own {
		t.Errorf("traceparent = %q, want only the caller's %q", got, own)
	}
}

func TestErrorsKeepTheirGRPCStatus(t *testing.T) {
	rec, address := serve(t)
	rec.fail = status.Error(codes.InvalidArgument, "features.f0: expected a double")
	gateway := dial(t, address, Config{})
	_, err := gateway.Predict(context.Background(), &gatewayv1.PredictRequest{Model: "demo"})
	if got := status.Convert(err); got.Code() != codes.InvalidArgument || got.Message() != "features.f0: expected a double" {
		t.Errorf("error %v, want INVALID_ARGUMENT with the server's message", err)
	}
}

func TestTokenFilesAndTLSFilesFailNamingWhatIsWrong(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	if token, err := ReadToken(write("token", "  s3cret\n")); err != nil || token != "s3cret" {
		t.Errorf("ReadToken = %q, %v; want the token without its whitespace", token, err)
	}
	if _, err := ReadToken(write("empty", " \n")); err == nil || !strings.Contains(err.Error(), "the file is empty") {
		t.Errorf("ReadToken of an empty file: %v", err)
	}
	if _, err := TLSFromFiles(write("ca.pem", "not a certificate"), "", "", ""); err == nil ||
		!strings.Contains(err.Error(), "expected PEM certificates") {
		t.Errorf("TLSFromFiles with a CA file that holds no certificate: %v", err)
	}
	if _, err := TLSFromFiles(filepath.Join(dir, "missing.pem"), "", "", ""); err == nil ||
		!strings.HasPrefix(err.Error(), "TLS CA file:") {
		t.Errorf("TLSFromFiles with no CA file: %v", err)
	}

	t.Setenv("FRESCO_TOKEN", "from-env")
	t.Setenv("FRESCO_TOKEN_FILE", "")
	t.Setenv("FRESCO_TLS_CA_FILE", "")
	if cfg, err := ConfigFromEnv(); err != nil || cfg.Token != "from-env" || cfg.TLS != nil {
		t.Errorf("ConfigFromEnv = %+v, %v; want FRESCO_TOKEN and no TLS", cfg, err)
	}
	t.Setenv("FRESCO_TOKEN_FILE", write("token-file", "from-file"))
	if cfg, err := ConfigFromEnv(); err != nil || cfg.Token != "from-file" {
		t.Errorf("ConfigFromEnv = %+v, %v; want FRESCO_TOKEN_FILE's token over FRESCO_TOKEN", cfg, err)
	}
}
