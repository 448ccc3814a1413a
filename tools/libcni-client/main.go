// libcni-client drives one libcni call, as a runtime built on libcni makes it, for pycni's
// tests: a JSON request on stdin, a JSON answer on stdout. It lets a test choose what no CLI
// can, e.g. GC's valid-attachments list present, empty, null (a nil slice) or absent (nil
// args), and a private result cache instead of /var/lib/cni.
//
// Request:  {"op": "add|check|del|gc|status", "conflist": {...}, "cniPath": [dirs],
//            "cacheDir": dir, "runtime": {"containerID", "netns", "ifName",
//            "args": [[k, v]], "capabilityArgs": {}},
//            "gc": {"validAttachments": [...] | null}   (no "gc" key: nil GCArgs)}
// Answer:   {"ok": true, "result": {...}} or {"ok": false, "error": {"code", "msg",
//            "details"}, "text": "..."}
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

type runtimeConf struct {
	ContainerID    string                 `json:"containerID"`
	NetNS          string                 `json:"netns"`
	IfName         string                 `json:"ifName"`
	Args           [][2]string            `json:"args"`
	CapabilityArgs map[string]interface{} `json:"capabilityArgs"`
}

type gcRequest struct {
	// A JSON null stays a nil slice: libcni then sends the key as null.
	ValidAttachments []types.GCAttachment `json:"validAttachments"`
}

type request struct {
	Op       string          `json:"op"`
	Conflist json.RawMessage `json:"conflist"`
	CNIPath  []string        `json:"cniPath"`
	CacheDir string          `json:"cacheDir"`
	Runtime  runtimeConf     `json:"runtime"`
	GC       *gcRequest      `json:"gc"`
}

type answer struct {
	OK     bool         `json:"ok"`
	Result interface{}  `json:"result,omitempty"`
	Error  *types.Error `json:"error,omitempty"`
	Text   string       `json:"text,omitempty"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail(fmt.Errorf("reading the request: %w", err))
	}
	list, err := libcni.ConfListFromBytes(req.Conflist)
	if err != nil {
		fail(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(req.CNIPath, req.CacheDir, nil)
	rt := &libcni.RuntimeConf{
		ContainerID:    req.Runtime.ContainerID,
		NetNS:          req.Runtime.NetNS,
		IfName:         req.Runtime.IfName,
		Args:           req.Runtime.Args,
		CapabilityArgs: req.Runtime.CapabilityArgs,
	}
	ctx := context.Background()
	var result interface{}
	switch req.Op {
	case "add":
		var r types.Result
		if r, err = cni.AddNetworkList(ctx, list, rt); err == nil {
			result = r
		}
	case "check":
		err = cni.CheckNetworkList(ctx, list, rt)
	case "del":
		err = cni.DelNetworkList(ctx, list, rt)
	case "gc":
		var args *libcni.GCArgs
		if req.GC != nil {
			args = &libcni.GCArgs{ValidAttachments: req.GC.ValidAttachments}
		}
		err = cni.GCNetworkList(ctx, list, args)
	case "status":
		err = cni.GetStatusNetworkList(ctx, list)
	default:
		err = fmt.Errorf("unknown op %q", req.Op)
	}
	if err != nil {
		fail(err)
	}
	write(answer{OK: true, Result: result})
}

func fail(err error) {
	a := answer{Text: err.Error()}
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		a.Error = cniErr
	}
	write(a)
	os.Exit(1)
}

func write(a answer) {
	if err := json.NewEncoder(os.Stdout).Encode(a); err != nil {
		os.Exit(2)
	}
}
