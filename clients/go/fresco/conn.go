// Package fresco is a small Go client for Fresco's services, over the stubs generated from the same
// contracts as the Python ones (clients/go/gen): predictions through the gateway, features from the
// feature service and assignments from the experiment service.
//
// Every call carries the caller's context deadline (DefaultTimeout when the context has none), the W3C
// trace context of the span in the context (traceparent metadata, OpenTelemetry's propagator) and the
// bearer token. Errors are the gRPC status errors the services return: use status.Code(err).
package fresco

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"go.opentelemetry.io/otel/propagation"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// DefaultTimeout bounds a call whose context has no deadline: Fresco's answers are small, and anything
// slower is an outage, not a slow model (the Python client's default too).
const DefaultTimeout = 10 * time.Second

// MaxMessageBytes is what the client sends and receives at most: the services' own limit (64 MiB), never
// gRPC's 4 MiB default.
const MaxMessageBytes = 64 << 20

// Config is how a client reaches a service: a bearer token and TLS, both optional.
type Config struct {
	// Token is the bearer token sent with every call; empty sends none.
	Token string
	// TLS, when set, makes the connection TLS (with a client certificate for mTLS if it has one).
	TLS *tls.Config
	// Timeout bounds calls whose context has no deadline; zero means DefaultTimeout.
	Timeout time.Duration
}

// ConfigFromEnv reads the variables the Python client and the CLI read: FRESCO_TOKEN or FRESCO_TOKEN_FILE,
// and FRESCO_TLS_CA_FILE, FRESCO_TLS_CERT_FILE, FRESCO_TLS_KEY_FILE, FRESCO_TLS_SERVER_NAME.
func ConfigFromEnv() (Config, error) {
	var cfg Config
	if path := os.Getenv("FRESCO_TOKEN_FILE"); path != "" {
		token, err := ReadToken(path)
		if err != nil {
			return cfg, err
		}
		cfg.Token = token
	} else {
		cfg.Token = os.Getenv("FRESCO_TOKEN")
	}
	if ca := os.Getenv("FRESCO_TLS_CA_FILE"); ca != "" {
		tlsConfig, err := TLSFromFiles(ca, os.Getenv("FRESCO_TLS_CERT_FILE"), os.Getenv("FRESCO_TLS_KEY_FILE"),
			os.Getenv("FRESCO_TLS_SERVER_NAME"))
		if err != nil {
			return cfg, err
		}
		cfg.TLS = tlsConfig
	}
	return cfg, nil
}

// ReadToken reads a bearer token kept in a file, surrounding whitespace dropped; an empty file is an error.
func ReadToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	token := strings.TrimSpace(string(data))
	if token == "" {
		return "", fmt.Errorf("%s: expected a bearer token, the file is empty", path)
	}
	return token, nil
}

// TLSFromFiles is a TLS configuration that verifies the server against the PEM CA in caFile and, given
// certFile and keyFile, presents that client certificate (mTLS); serverName, when set, is the name expected
// in the server's certificate instead of the dialled host.
func TLSFromFiles(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("TLS CA file: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("TLS CA file %s: expected PEM certificates", caFile)
	}
	config := &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("TLS client certificate: a certificate needs its key, and a key its certificate")
	}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("TLS client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// Conn is a connection to one Fresco service; one is safe for concurrent use and should be shared.
type Conn struct {
	cc *grpc.ClientConn
}

// Dial connects lazily to target (host:port, or any gRPC target such as dns:///name:port).
func Dial(target string, cfg Config) (*Conn, error) {
	transport := insecure.NewCredentials()
	if cfg.TLS != nil {
		transport = credentials.NewTLS(cfg.TLS)
	}
	timeout := cfg.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	options := []grpc.DialOption{
		grpc.WithTransportCredentials(transport),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageBytes), grpc.MaxCallSendMsgSize(MaxMessageBytes)),
		grpc.WithChainUnaryInterceptor(callContext(timeout)),
		grpc.WithChainStreamInterceptor(streamContext),
	}
	if cfg.Token != "" {
		options = append(options, grpc.WithPerRPCCredentials(bearerToken{token: cfg.Token, tls: cfg.TLS != nil}))
	}
	cc, err := grpc.NewClient(target, options...)
	if err != nil {
		return nil, fmt.Errorf("fresco: dial %s: %w", target, err)
	}
	return &Conn{cc: cc}, nil
}

// ClientConn is the underlying gRPC connection, for any generated stub (clients/go/gen) the helpers here
// do not cover; calls through it carry the token and the trace context too, and unary calls the default
// deadline (streams, often long-lived, only the context's own).
func (c *Conn) ClientConn() *grpc.ClientConn { return c.cc }

// Close closes the connection.
func (c *Conn) Close() error { return c.cc.Close() }

// bearerToken sends `authorization: Bearer <token>` with every call. Over TLS it insists on TLS; without
// TLS (a local suite on loopback) it sends the token in the clear, as the Python client does.
type bearerToken struct {
	token string
	tls   bool
}

func (b bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearerToken) RequireTransportSecurity() bool { return b.tls }

// traceContext writes the W3C traceparent (and tracestate) of the context's span.
var traceContext = propagation.TraceContext{}

// callContext gives a call without a deadline the default timeout, and sends the context's trace context
// unless the call's metadata already carries one (an instrumented caller's own).
func callContext(timeout time.Duration) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, timeout)
			defer cancel()
		}
		ctx = withTraceContext(ctx)
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

// streamContext sends the context's trace context on a stream; its deadline is the caller's alone.
func streamContext(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string,
	streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return streamer(withTraceContext(ctx), desc, cc, method, opts...)
}

func withTraceContext(ctx context.Context) context.Context {
	outgoing, _ := metadata.FromOutgoingContext(ctx)
	if len(outgoing.Get("traceparent")) > 0 {
		return ctx
	}
	carrier := propagation.MapCarrier{}
	traceContext.Inject(ctx, carrier)
	if len(carrier) == 0 {
		return ctx
	}
	pairs := make([]string, 0, 2*len(carrier))
	for key, value := range carrier {
		pairs = append(pairs, key, value)
	}
	return metadata.AppendToOutgoingContext(ctx, pairs...)
}
