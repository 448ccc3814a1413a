//go:build tools

// The commands ./dev kube builds, imported so that go.mod and go.sum pin all they need.
package tools

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "go.etcd.io/etcd/server/v3"
)
