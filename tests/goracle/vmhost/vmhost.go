// Package vmhost holds the seed's wire types and the Go server's per-connection logic as
// protocol.md describes it; the package name makes Go's error texts name vmhost.Request and
// vmhost.Method, as the real daemon's do.
package vmhost

import (
	"encoding/json"
	"fmt"
	"net"
)

// Method identifies an RPC call from the daemon to a vmhost process.
type Method string

const (
	MethodStatus    Method = "status"
	MethodStop      Method = "stop"
	MethodForceStop Method = "force_stop"
	MethodInfo      Method = "info"
)

// Request is the wire format for daemon -> vmhost RPC calls.
type Request struct {
	Method         Method `json:"method"`
	TimeoutSeconds int    `json:"timeout_seconds,omitempty"`
}

// Response is the wire format for vmhost -> daemon responses.
type Response struct {
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
	State   string `json:"state,omitempty"`
	SSHPort int    `json:"ssh_port,omitempty"`
	Backend string `json:"backend,omitempty"`
}

// VM is what a connection is answered from: a VM that stays in State.
type VM struct {
	State   string
	SSHPort int
	Backend string
}

// Handle serves one connection as the Go server does: one Decode, one Encode, close.
func (vm VM) Handle(conn net.Conn) {
	defer conn.Close()
	var req Request
	if err := json.NewDecoder(conn).Decode(&req); err != nil {
		_ = json.NewEncoder(conn).Encode(Response{OK: false, Error: "invalid request: " + err.Error()})
		return
	}
	var resp Response
	switch req.Method {
	case MethodStatus:
		resp = Response{OK: true, State: vm.State}
	case MethodInfo:
		resp = Response{OK: true, State: vm.State, SSHPort: vm.SSHPort, Backend: vm.Backend}
	case MethodStop, MethodForceStop:
		resp = Response{OK: true, State: "stopping"}
	default:
		resp = Response{OK: false, Error: fmt.Sprintf("unknown method: %s", req.Method)}
	}
	_ = json.NewEncoder(conn).Encode(resp)
}
