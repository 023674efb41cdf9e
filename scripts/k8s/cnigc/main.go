// cnigc drives CNI GC and STATUS (CNI spec 1.1.0) through libcni — the library release
// containerd 2.2 links (github.com/containernetworking/cni v1.3.0) — for one network config
// list, exactly as a runtime would. Used by scripts/cluster-e2e.sh: containerd 2.x sends STATUS
// itself (CRI Status -> go-cni Status -> libcni GetStatusNetworkList) but no containerd release
// calls GCNetworkList, so the GC of the node's conflist is driven from here with the runtime's
// live sandboxes as the valid attachments. Test infrastructure only.
//
//	cnigc gc     --conflist FILE [--bin-dir DIR] [--cache-dir DIR] [--valid ID/IFNAME]...
//	cnigc status --conflist FILE [--bin-dir DIR]
//
// gc: libcni DELs every cached attachment of the network that is not listed as valid, then
// sends GC with cni.dev/valid-attachments to every plugin of the list. Exit 0 on success;
// otherwise the error (with the plugin's CNI error) on stderr and exit 1.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

type attachments []types.GCAttachment

func (a *attachments) String() string { return fmt.Sprint(*a) }

func (a *attachments) Set(v string) error {
	id, ifname, ok := strings.Cut(v, "/")
	if !ok || id == "" || ifname == "" {
		return fmt.Errorf("--valid %q: want CONTAINER_ID/IFNAME", v)
	}
	*a = append(*a, types.GCAttachment{ContainerID: id, IfName: ifname})
	return nil
}

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "gc" && os.Args[1] != "status") {
		fmt.Fprintln(os.Stderr, "usage: cnigc gc|status --conflist FILE [--bin-dir DIR] [--cache-dir DIR] [--valid ID/IFNAME]...")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	conflist := fs.String("conflist", "", "network config list file")
	binDir := fs.String("bin-dir", "/opt/cni/bin", "CNI plugin directory")
	cacheDir := fs.String("cache-dir", "", "libcni cache dir (default: libcni's, /var/lib/cni)")
	var valid attachments
	fs.Var(&valid, "valid", "a valid attachment CONTAINER_ID/IFNAME (repeatable)")
	_ = fs.Parse(os.Args[2:])
	if *conflist == "" {
		fmt.Fprintln(os.Stderr, "cnigc: --conflist is required")
		os.Exit(2)
	}
	list, err := libcni.ConfListFromFile(*conflist)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cnigc: reading %s: %v\n", *conflist, err)
		os.Exit(1)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{*binDir}, *cacheDir, nil)
	ctx := context.Background()
	switch cmd {
	case "gc":
		if valid == nil {
			valid = attachments{}
		}
		err = cni.GCNetworkList(ctx, list, &libcni.GCArgs{ValidAttachments: valid})
	case "status":
		err = cni.GetStatusNetworkList(ctx, list)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "cnigc %s %s (network %s, cniVersion %s): %v\n", cmd, *conflist, list.Name, list.CNIVersion, err)
		os.Exit(1)
	}
	fmt.Printf("cnigc %s: network %s (cniVersion %s, %d plugins): ok\n", cmd, list.Name, list.CNIVersion, len(list.Plugins))
}
