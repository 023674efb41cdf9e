//go:build tools

// The command scripts/k8s-build.sh builds (etcd's server main package).
package tools

import _ "go.etcd.io/etcd/server/v3"
