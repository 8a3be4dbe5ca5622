package main

import (
	"fmt"
	"net"
	"sort"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// actor is a pod template of the namespace, or an outside peer, as NetworkPolicies see it.
type actor struct {
	name       string
	namespace  string // "" for an address off the cluster
	labels     map[string]string
	ip         string
	containers []corev1.Container // nil outside the namespace
}

func (a actor) inside() bool { return a.containers != nil }

// checkNetworkPolicies evaluates the rendered policies as Kubernetes defines them: every pod of the
// namespace is isolated both ways, every call of the graph is admitted, and no other caller reaches
// any port of a pod in the namespace, nor does any pod reach the internet.
func checkNetworkPolicies(o *objects, graph *callGraph) []string {
	var problems []string
	actors := map[string]actor{}
	var inside []string
	for _, w := range o.workloads {
		name := w.labels[componentLabel]
		actors[name] = actor{name: name, namespace: w.namespace, labels: w.labels, containers: w.spec.Containers}
		inside = append(inside, name)
	}
	sort.Strings(inside)
	for name, peer := range graph.Outside {
		actors[name] = actor{name: name, namespace: peer.Namespace, labels: peer.Labels, ip: peer.IP}
	}
	namespaceLabels := func(namespace string) map[string]string {
		if l, ok := o.namespaces[namespace]; ok {
			return l
		}
		return map[string]string{"kubernetes.io/metadata.name": namespace}
	}
	for _, name := range inside {
		a := actors[name]
		if !isolated(o.policies, a, networkingv1.PolicyTypeIngress) || !isolated(o.policies, a, networkingv1.PolicyTypeEgress) {
			problems = append(problems, fmt.Sprintf("pods of %s are not isolated for both ingress and egress (a default-deny policy must select them)", name))
		}
	}
	inGraph := map[string]bool{}
	open := map[string]bool{} // "callee port protocol" anyone may call
	for _, c := range graph.Calls {
		if graph.Outside[c.From].Everyone {
			open[c.To+" "+c.Port.String()+" "+c.Protocol] = true
		}
		from, okFrom := actors[c.From]
		to, okTo := actors[c.To]
		if !okFrom || !okTo {
			problems = append(problems, fmt.Sprintf("call graph: %s -> %s names a peer that is neither rendered nor outside", c.From, c.To))
			continue
		}
		inGraph[c.From+" "+c.To+" "+c.Port.String()+" "+c.Protocol] = true
		if !admitted(o.policies, namespaceLabels, from, to, c.Port, corev1.Protocol(c.Protocol)) {
			problems = append(problems, fmt.Sprintf("NetworkPolicies refuse the call %s -> %s:%s/%s", c.From, c.To, c.Port.String(), c.Protocol))
		}
	}
	callers := append([]string{}, inside...)
	for name := range graph.Outside {
		callers = append(callers, name)
	}
	sort.Strings(callers)
	for _, fromName := range callers {
		from := actors[fromName]
		for _, toName := range inside {
			to := actors[toName]
			for _, c := range to.containers {
				for _, p := range c.Ports {
					proto := p.Protocol
					if proto == "" {
						proto = corev1.ProtocolTCP
					}
					port := intstr.FromString(p.Name)
					if inGraph[fromName+" "+toName+" "+p.Name+" "+string(proto)] || open[toName+" "+p.Name+" "+string(proto)] {
						continue
					}
					if admitted(o.policies, namespaceLabels, from, to, port, proto) {
						problems = append(problems, fmt.Sprintf("NetworkPolicies admit %s -> %s:%s/%s, which is not in the call graph", fromName, toName, p.Name, proto))
					}
				}
			}
		}
		if internet, ok := actors["internet"]; ok && from.inside() && !inGraph[fromName+" internet 443 TCP"] {
			if admitted(o.policies, namespaceLabels, from, internet, intstr.FromInt32(443), corev1.ProtocolTCP) {
				problems = append(problems, fmt.Sprintf("NetworkPolicies let %s reach the internet", fromName))
			}
		}
	}
	return problems
}

func policyTypes(p *networkingv1.NetworkPolicy) []networkingv1.PolicyType {
	if len(p.Spec.PolicyTypes) > 0 {
		return p.Spec.PolicyTypes
	}
	types := []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	if len(p.Spec.Egress) > 0 {
		types = append(types, networkingv1.PolicyTypeEgress)
	}
	return types
}

// applying lists the policies of the pod's namespace that select it for one direction.
func applying(policies []*networkingv1.NetworkPolicy, pod actor, direction networkingv1.PolicyType) []*networkingv1.NetworkPolicy {
	var out []*networkingv1.NetworkPolicy
	for _, p := range policies {
		if p.Namespace != pod.namespace {
			continue
		}
		selector, err := metav1.LabelSelectorAsSelector(&p.Spec.PodSelector)
		if err != nil || !selector.Matches(labels.Set(pod.labels)) {
			continue
		}
		for _, t := range policyTypes(p) {
			if t == direction {
				out = append(out, p)
			}
		}
	}
	return out
}

func isolated(policies []*networkingv1.NetworkPolicy, pod actor, direction networkingv1.PolicyType) bool {
	return len(applying(policies, pod, direction)) > 0
}

// admitted: the caller's egress (if its pods are isolated) and the callee's ingress (likewise) both
// allow a connection to the callee's port. Other namespaces' own policies are not modelled.
func admitted(policies []*networkingv1.NetworkPolicy, nsLabels func(string) map[string]string, from, to actor, port intstr.IntOrString, protocol corev1.Protocol) bool {
	number, named := resolvePort(to, port, protocol)
	if !named {
		return false
	}
	if from.inside() {
		egress := applying(policies, from, networkingv1.PolicyTypeEgress)
		ok := len(egress) == 0
		for _, p := range egress {
			for _, rule := range p.Spec.Egress {
				ok = ok || (peersMatch(rule.To, p.Namespace, to, nsLabels) && portsMatch(rule.Ports, to, number, protocol))
			}
		}
		if !ok {
			return false
		}
	}
	if to.inside() {
		ingress := applying(policies, to, networkingv1.PolicyTypeIngress)
		ok := len(ingress) == 0
		for _, p := range ingress {
			for _, rule := range p.Spec.Ingress {
				ok = ok || (peersMatch(rule.From, p.Namespace, from, nsLabels) && portsMatch(rule.Ports, to, number, protocol))
			}
		}
		return ok
	}
	return true
}

// resolvePort turns a port reference into the number the callee serves it on.
func resolvePort(to actor, port intstr.IntOrString, protocol corev1.Protocol) (int32, bool) {
	if port.Type == intstr.Int {
		return port.IntVal, true
	}
	p, ok := servedPort(to.containers, port, protocol)
	return p.ContainerPort, ok
}

func peersMatch(peers []networkingv1.NetworkPolicyPeer, policyNamespace string, a actor, nsLabels func(string) map[string]string) bool {
	if len(peers) == 0 {
		return true // no `from`/`to`: every peer
	}
	for _, peer := range peers {
		if peer.IPBlock != nil {
			if a.ip != "" && inBlock(a.ip, peer.IPBlock) {
				return true
			}
			continue
		}
		if a.namespace == "" {
			continue // an address off the cluster is matched by ipBlocks only
		}
		if peer.NamespaceSelector == nil {
			if a.namespace != policyNamespace {
				continue
			}
		} else if selector, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector); err != nil || !selector.Matches(labels.Set(nsLabels(a.namespace))) {
			continue
		}
		if peer.PodSelector != nil {
			if selector, err := metav1.LabelSelectorAsSelector(peer.PodSelector); err != nil || !selector.Matches(labels.Set(a.labels)) {
				continue
			}
		}
		return true
	}
	return false
}

func inBlock(ip string, block *networkingv1.IPBlock) bool {
	address := net.ParseIP(ip)
	_, cidr, err := net.ParseCIDR(block.CIDR)
	if err != nil || address == nil || !cidr.Contains(address) {
		return false
	}
	for _, except := range block.Except {
		if _, excluded, err := net.ParseCIDR(except); err == nil && excluded.Contains(address) {
			return false
		}
	}
	return true
}

func portsMatch(ports []networkingv1.NetworkPolicyPort, to actor, number int32, protocol corev1.Protocol) bool {
	if len(ports) == 0 {
		return true
	}
	for _, p := range ports {
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		if proto != protocol {
			continue
		}
		if p.Port == nil {
			return true
		}
		if p.Port.Type == intstr.String {
			// A named port is the callee's container port of that name.
			if served, ok := servedPort(to.containers, *p.Port, protocol); ok && served.ContainerPort == number {
				return true
			}
			continue
		}
		end := p.Port.IntVal
		if p.EndPort != nil {
			end = *p.EndPort
		}
		if number >= p.Port.IntVal && number <= end {
			return true
		}
	}
	return false
}
