package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/util/intstr"
)

// outsidePeer is a caller or callee beyond the namespace: pods of another namespace, or an address.
type outsidePeer struct {
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels"`
	IP        string            `json:"ip"`
	// Everyone: a call from this peer stands for a call from anyone, in the namespace or not.
	Everyone bool `json:"everyone"`
}

// call is one edge of the architecture's call graph.
type call struct {
	From     string             `json:"from"`
	To       string             `json:"to"`
	Port     intstr.IntOrString `json:"port"`
	Protocol string             `json:"protocol"`
}

type callGraph struct {
	Outside map[string]outsidePeer `json:"outside"`
	Calls   []call                 `json:"calls"`
}

func loadCallGraph(path string) (*callGraph, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var graph callGraph
	if err := decodeStrict(raw, &graph); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	for i := range graph.Calls {
		if graph.Calls[i].Protocol == "" {
			graph.Calls[i].Protocol = "TCP"
		}
	}
	return &graph, nil
}

func loadSettings(path string) (map[string][]string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var settings map[string][]string
	if err := json.Unmarshal(raw, &settings); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return settings, nil
}
