// Command validate renders Fresco's kustomize overlays and checks them offline: every object decoded
// strictly into Kubernetes' own Go types, Services that select pods, probes on served ports, the
// security context of every container, the NetworkPolicies against the call graph, and the Dockerfile.
//
//	validate -callgraph deploy/kubernetes/callgraph.yaml -settings env.json -dockerfile deploy/docker/Dockerfile \
//	    deploy/kubernetes/overlays/dev deploy/kubernetes/overlays/production
//
// It prints one line per overlay and per problem, and exits 1 when any check fails.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

func main() {
	callgraphPath := flag.String("callgraph", "", "YAML file of the calls the NetworkPolicies must admit (required)")
	settingsPath := flag.String("settings", "", "JSON object: component -> the FRESCO_* variables its settings accept")
	dockerfilePath := flag.String("dockerfile", "", "Dockerfile of the services' image, checked too when set")
	provided := flag.String("provided-secrets", "", "comma-separated Secrets created outside the overlays (e.g. by cert-manager)")
	printTo := flag.String("print-to", "", "directory to write each overlay's rendered YAML into (<dir>/<overlay>.yaml)")
	flag.Parse()
	for _, name := range strings.Split(*provided, ",") {
		if name != "" {
			providedSecrets[name] = true
		}
	}
	if *callgraphPath == "" || flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: validate -callgraph FILE [-settings FILE] [-dockerfile FILE] OVERLAY_DIR...")
		os.Exit(2)
	}
	graph, err := loadCallGraph(*callgraphPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var settings map[string][]string
	if *settingsPath != "" {
		if settings, err = loadSettings(*settingsPath); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
	}
	failed := false
	report := func(scope string, problems []string) {
		for _, p := range problems {
			fmt.Printf("FAIL %s: %s\n", scope, p)
		}
		failed = failed || len(problems) > 0
	}
	if *dockerfilePath != "" {
		report(*dockerfilePath, checkDockerfile(*dockerfilePath))
	}
	for _, dir := range flag.Args() {
		objects, problems := renderAndDecode(dir)
		if *printTo != "" && objects != nil {
			target := filepath.Join(*printTo, filepath.Base(filepath.Clean(dir))+".yaml")
			if err := os.WriteFile(target, objects.rendered, 0o644); err != nil {
				problems = append(problems, err.Error())
			}
		}
		if len(problems) == 0 {
			problems = checkAll(objects, graph, settings)
		}
		report(dir, problems)
		if len(problems) == 0 {
			fmt.Printf("ok %s: %d objects, %d workloads, %d network policies, %d calls admitted\n",
				dir, len(objects.all), len(objects.workloads), len(objects.policies), len(graph.Calls))
		}
	}
	if failed {
		os.Exit(1)
	}
}
