// Package conformance runs containerd's own snapshotter test suite (snapshots/testsuite, containerd
// 1.6) against a running `damselfly serve`, through containerd's proxy client: the same gRPC calls
// containerd makes to a proxy_plugins snapshotter.
//
// Built in GOPATH mode against Debian's golang-github-containerd-containerd-dev (no module downloads):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go test -c -o conformance.test .
//	./conformance.test -test.v -damselfly.address /run/damselfly/snapshotter.sock
//
// The suite runs its tests in parallel and makes one snapshotter per test; its keys repeat across
// tests and runs (Go 1.19's math/rand is unseeded). So each test gets a namespace of its own, sent
// as containerd-namespace on every call, and a cleanup that removes every snapshot of that namespace,
// children first. tests/conformance/test_conformance.py builds and runs this.
package conformance

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

var address = flag.String("damselfly.address", "", "unix socket of the `damselfly serve` under test")

// namespaceHeader is the gRPC metadata key containerd reads the namespace from.
const namespaceHeader = "containerd-namespace"

var testCount int64

// withNamespace replaces the namespace of every outgoing call (the suite's contexts all carry
// "testsuite") with ns.
func withNamespace(ctx context.Context, ns string) context.Context {
	md, ok := metadata.FromOutgoingContext(ctx)
	if ok {
		md = md.Copy()
	} else {
		md = metadata.MD{}
	}
	md.Set(namespaceHeader, ns)
	return metadata.NewOutgoingContext(ctx, md)
}

func dial(ns string) (*grpc.ClientConn, error) {
	path := *address
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return grpc.DialContext(ctx, "damselfly",
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply interface{},
			cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return invoker(withNamespace(ctx, ns), method, req, reply, cc, opts...)
		}),
		grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
			method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			return streamer(withNamespace(ctx, ns), desc, cc, method, opts...)
		}),
	)
}

// removeAll removes every snapshot the namespace holds, leaves (no children) first.
func removeAll(ctx context.Context, sn snapshots.Snapshotter) error {
	for {
		var infos []snapshots.Info
		if err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
			infos = append(infos, info)
			return nil
		}); err != nil {
			return fmt.Errorf("walk: %w", err)
		}
		if len(infos) == 0 {
			return nil
		}
		isParent := map[string]bool{}
		for _, info := range infos {
			if info.Parent != "" {
				isParent[info.Parent] = true
			}
		}
		removed := 0
		for _, info := range infos {
			if isParent[info.Name] {
				continue
			}
			if err := sn.Remove(ctx, info.Name); err != nil {
				return fmt.Errorf("remove %q: %w", info.Name, err)
			}
			removed++
		}
		if removed == 0 {
			return fmt.Errorf("%d snapshots left and none is a leaf", len(infos))
		}
	}
}

func TestSnapshotterSuite(t *testing.T) {
	if *address == "" {
		t.Fatal("-damselfly.address is required: the socket of a running `damselfly serve`")
	}
	testsuite.SnapshotterSuite(t, "Damselfly", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		ns := fmt.Sprintf("conformance-%d-%d", os.Getpid(), atomic.AddInt64(&testCount, 1))
		conn, err := dial(ns)
		if err != nil {
			return nil, nil, fmt.Errorf("connect to %s: %w", *address, err)
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "damselfly")
		cleanup := func() error {
			defer conn.Close()
			if err := removeAll(context.Background(), sn); err != nil {
				return fmt.Errorf("namespace %s: %w", ns, err)
			}
			return nil
		}
		return sn, cleanup, nil
	})
}
