package main

import (
	"fmt"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

const componentLabel = "app.kubernetes.io/component"

// frescoServices are the components that run `python -m <module>` from Fresco's image.
var frescoServices = map[string]string{
	"gateway":            "gateway",
	"predictor":          "predictor",
	"feature-service":    "feature_service",
	"model-manager":      "model_manager",
	"experiment-service": "experiment_service",
}

// singleReplica are services that run exactly one replica by design (see the README's "Deploying"):
// they get a PodDisruptionBudget but no HorizontalPodAutoscaler.
var singleReplica = map[string]bool{"model-manager": true}

func selects(selector *metav1.LabelSelector, podLabels map[string]string) bool {
	parsed, err := metav1.LabelSelectorAsSelector(selector)
	if err != nil {
		return false
	}
	return !parsed.Empty() && parsed.Matches(labels.Set(podLabels))
}

func checkAll(o *objects, graph *callGraph, settings map[string][]string) []string {
	var problems []string
	problems = append(problems, checkServices(o)...)
	for _, w := range o.workloads {
		problems = append(problems, checkWorkload(o, w, settings)...)
	}
	problems = append(problems, checkScaling(o)...)
	problems = append(problems, checkNetworkPolicies(o, graph)...)
	return problems
}

// checkServices: every Service selects some pod template in its namespace, and each of its target
// ports is a port those pods' containers serve.
func checkServices(o *objects) []string {
	var problems []string
	for _, s := range o.services {
		if len(s.Spec.Selector) == 0 {
			problems = append(problems, fmt.Sprintf("Service %s/%s has no selector", s.Namespace, s.Name))
			continue
		}
		selector := labels.SelectorFromSet(s.Spec.Selector)
		var matched []workload
		for _, w := range o.workloads {
			if w.namespace == s.Namespace && selector.Matches(labels.Set(w.labels)) {
				matched = append(matched, w)
			}
		}
		if len(matched) == 0 {
			problems = append(problems, fmt.Sprintf("Service %s/%s selects no pods (selector %v)", s.Namespace, s.Name, s.Spec.Selector))
			continue
		}
		for _, port := range s.Spec.Ports {
			target := port.TargetPort
			if target.Type == intstr.Int && target.IntVal == 0 {
				target = intstr.FromInt32(port.Port)
			}
			for _, w := range matched {
				if _, ok := servedPort(w.spec.Containers, target, port.Protocol); !ok {
					problems = append(problems, fmt.Sprintf("Service %s/%s port %q targets %s, which %s %s does not serve",
						s.Namespace, s.Name, port.Name, target.String(), w.kind, w.name))
				}
			}
		}
	}
	return problems
}

// servedPort finds the container port a port reference (a number or a name) names.
func servedPort(containers []corev1.Container, ref intstr.IntOrString, protocol corev1.Protocol) (corev1.ContainerPort, bool) {
	if protocol == "" {
		protocol = corev1.ProtocolTCP
	}
	for _, c := range containers {
		for _, p := range c.Ports {
			proto := p.Protocol
			if proto == "" {
				proto = corev1.ProtocolTCP
			}
			if proto != protocol {
				continue
			}
			if (ref.Type == intstr.String && p.Name == ref.StrVal) || (ref.Type == intstr.Int && p.ContainerPort == ref.IntVal) {
				return p, true
			}
		}
	}
	return corev1.ContainerPort{}, false
}

func checkWorkload(o *objects, w workload, settings map[string][]string) []string {
	var problems []string
	where := fmt.Sprintf("%s %s/%s", w.kind, w.namespace, w.name)
	component := w.labels[componentLabel]
	if component == "" {
		problems = append(problems, fmt.Sprintf("%s: pod template has no %s label", where, componentLabel))
	}
	pod := w.spec.SecurityContext
	podNonRoot := pod != nil && pod.RunAsNonRoot != nil && *pod.RunAsNonRoot
	var podUser *int64
	if pod != nil {
		podUser = pod.RunAsUser
	}
	if w.spec.AutomountServiceAccountToken == nil || *w.spec.AutomountServiceAccountToken {
		problems = append(problems, fmt.Sprintf("%s: automountServiceAccountToken must be false (no Fresco pod calls the Kubernetes API)", where))
	}
	all := append(append([]corev1.Container{}, w.spec.InitContainers...), w.spec.Containers...)
	for _, c := range all {
		cw := fmt.Sprintf("%s container %s", where, c.Name)
		problems = append(problems, checkSecurity(cw, c, podNonRoot, podUser)...)
		problems = append(problems, checkResources(cw, c)...)
		problems = append(problems, checkMounts(o, w, cw, c)...)
		problems = append(problems, checkEnvReferences(o, w, cw, c)...)
	}
	for _, c := range w.spec.Containers {
		cw := fmt.Sprintf("%s container %s", where, c.Name)
		problems = append(problems, checkProbes(cw, c, frescoServices[component] != "")...)
	}
	if module, ok := frescoServices[component]; ok {
		problems = append(problems, checkFrescoContainer(where, w.spec.Containers[0], module, settings[component])...)
		if w.podAnnotations["prometheus.io/scrape"] != "true" || w.podAnnotations["prometheus.io/port"] == "" {
			problems = append(problems, fmt.Sprintf("%s: pods lack prometheus.io/scrape and prometheus.io/port annotations", where))
		} else if _, ok := servedPort(w.spec.Containers, intstr.Parse(w.podAnnotations["prometheus.io/port"]), corev1.ProtocolTCP); !ok {
			problems = append(problems, fmt.Sprintf("%s: prometheus.io/port %s is not a port its containers serve", where, w.podAnnotations["prometheus.io/port"]))
		}
	}
	return problems
}

func checkSecurity(where string, c corev1.Container, podNonRoot bool, podUser *int64) []string {
	var problems []string
	s := c.SecurityContext
	if s == nil {
		return []string{where + ": no securityContext"}
	}
	nonRoot := podNonRoot
	if s.RunAsNonRoot != nil {
		nonRoot = *s.RunAsNonRoot
	}
	if !nonRoot {
		problems = append(problems, where+": runAsNonRoot is not true")
	}
	user := podUser
	if s.RunAsUser != nil {
		user = s.RunAsUser
	}
	// A numeric uid the kubelet can check against runAsNonRoot whatever the image's USER says.
	if user == nil || *user == 0 {
		problems = append(problems, where+": runAsUser (pod or container) is not a non-root uid")
	}
	if s.ReadOnlyRootFilesystem == nil || !*s.ReadOnlyRootFilesystem {
		problems = append(problems, where+": readOnlyRootFilesystem is not true")
	}
	if s.AllowPrivilegeEscalation == nil || *s.AllowPrivilegeEscalation {
		problems = append(problems, where+": allowPrivilegeEscalation is not false")
	}
	if s.Privileged != nil && *s.Privileged {
		problems = append(problems, where+": privileged")
	}
	dropsAll := false
	if s.Capabilities != nil {
		for _, dropped := range s.Capabilities.Drop {
			dropsAll = dropsAll || dropped == "ALL"
		}
		if len(s.Capabilities.Add) > 0 {
			problems = append(problems, fmt.Sprintf("%s: adds capabilities %v", where, s.Capabilities.Add))
		}
	}
	if !dropsAll {
		problems = append(problems, where+": does not drop ALL capabilities")
	}
	return problems
}

func checkResources(where string, c corev1.Container) []string {
	var problems []string
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if _, ok := c.Resources.Requests[name]; !ok {
			problems = append(problems, fmt.Sprintf("%s: no %s request", where, name))
		}
	}
	if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
		problems = append(problems, where+": no memory limit")
	}
	return problems
}

// checkProbes: each probe names a port the container serves; Fresco's services use native gRPC probes
// (grpc.health.v1) for readiness and liveness.
func checkProbes(where string, c corev1.Container, frescoService bool) []string {
	var problems []string
	probes := map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe}
	names := []string{"liveness", "readiness", "startup"}
	for _, kind := range names {
		probe := probes[kind]
		if probe == nil {
			if kind != "startup" {
				problems = append(problems, fmt.Sprintf("%s: no %s probe", where, kind))
			}
			continue
		}
		var ref intstr.IntOrString
		switch {
		case probe.GRPC != nil:
			ref = intstr.FromInt32(probe.GRPC.Port)
		case probe.HTTPGet != nil:
			ref = probe.HTTPGet.Port
		case probe.TCPSocket != nil:
			ref = probe.TCPSocket.Port
		case probe.Exec != nil:
			problems = append(problems, fmt.Sprintf("%s: %s probe runs a command; probe a port", where, kind))
			continue
		}
		if _, ok := servedPort([]corev1.Container{c}, ref, corev1.ProtocolTCP); !ok {
			problems = append(problems, fmt.Sprintf("%s: %s probe names port %s, which the container does not serve", where, kind, ref.String()))
		}
		if frescoService && kind != "startup" && probe.GRPC == nil {
			problems = append(problems, fmt.Sprintf("%s: %s probe is not a native gRPC probe (grpc.health.v1)", where, kind))
		}
	}
	return problems
}

// checkMounts: every volume mount names a volume, and every Secret, ConfigMap and claim a volume uses
// is rendered here (Secrets marked optional, or listed in externalSecrets, may come from elsewhere).
func checkMounts(o *objects, w workload, where string, c corev1.Container) []string {
	var problems []string
	volumes := map[string]corev1.Volume{}
	for _, v := range w.spec.Volumes {
		volumes[v.Name] = v
	}
	for _, name := range w.claimTemplates {
		volumes[name] = corev1.Volume{Name: name}
	}
	for _, m := range c.VolumeMounts {
		v, ok := volumes[m.Name]
		if !ok {
			problems = append(problems, fmt.Sprintf("%s: mounts volume %q, which the pod does not have", where, m.Name))
			continue
		}
		switch {
		case v.ConfigMap != nil && !o.configMaps[w.namespace+"/"+v.ConfigMap.Name]:
			problems = append(problems, fmt.Sprintf("%s: volume %q uses ConfigMap %s, which is not rendered", where, v.Name, v.ConfigMap.Name))
		case v.Secret != nil && !o.secrets[w.namespace+"/"+v.Secret.SecretName] && !externalSecret(v.Secret.SecretName):
			problems = append(problems, fmt.Sprintf("%s: volume %q uses Secret %s, which is neither rendered nor provided outside", where, v.Name, v.Secret.SecretName))
		case v.PersistentVolumeClaim != nil && !o.claims[w.namespace+"/"+v.PersistentVolumeClaim.ClaimName]:
			problems = append(problems, fmt.Sprintf("%s: volume %q uses claim %s, which is not rendered", where, v.Name, v.PersistentVolumeClaim.ClaimName))
		}
	}
	return problems
}

// providedSecrets are Secrets the cluster's operators create (cert-manager, a vault), not the overlay.
var providedSecrets = map[string]bool{}

func externalSecret(name string) bool {
	return providedSecrets[name]
}

func checkEnvReferences(o *objects, w workload, where string, c corev1.Container) []string {
	var problems []string
	for _, e := range c.Env {
		if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
			continue
		}
		name := e.ValueFrom.SecretKeyRef.Name
		if !o.secrets[w.namespace+"/"+name] && !externalSecret(name) {
			problems = append(problems, fmt.Sprintf("%s: env %s reads Secret %s, which is neither rendered nor provided outside", where, e.Name, name))
		}
	}
	return problems
}

// checkFrescoContainer: the image's `python -m <module>`, and only FRESCO_* variables the service's
// settings accept (a misspelled setting would be silently ignored by the service).
func checkFrescoContainer(where string, c corev1.Container, module string, known []string) []string {
	var problems []string
	if strings.Join(c.Command, " ") != "python -m "+module {
		problems = append(problems, fmt.Sprintf("%s: command is %q, expected \"python -m %s\"", where, c.Command, module))
	}
	if known == nil {
		return problems
	}
	accepted := map[string]bool{}
	for _, name := range known {
		accepted[name] = true
	}
	var unknown []string
	for _, e := range c.Env {
		if strings.HasPrefix(e.Name, "FRESCO_") && !accepted[e.Name] {
			unknown = append(unknown, e.Name)
		}
	}
	sort.Strings(unknown)
	for _, name := range unknown {
		problems = append(problems, fmt.Sprintf("%s: env %s is not a setting of %s", where, name, module))
	}
	return problems
}

// checkScaling: each workload has a PodDisruptionBudget selecting its pods, and each but the
// single-replica ones a HorizontalPodAutoscaler on it.
func checkScaling(o *objects) []string {
	var problems []string
	for _, w := range o.workloads {
		component := w.labels[componentLabel]
		if _, ok := frescoServices[component]; !ok && component != "envoy" {
			continue
		}
		where := fmt.Sprintf("%s %s/%s", w.kind, w.namespace, w.name)
		budgets := 0
		for _, b := range o.budgets {
			if b.Namespace == w.namespace && b.Spec.Selector != nil && selects(b.Spec.Selector, w.labels) {
				budgets++
			}
		}
		if budgets != 1 {
			problems = append(problems, fmt.Sprintf("%s: %d PodDisruptionBudgets select its pods, expected 1", where, budgets))
		}
		scalers := 0
		for _, a := range o.autoscalers {
			ref := a.Spec.ScaleTargetRef
			if a.Namespace == w.namespace && ref.Kind == w.kind && ref.Name == w.name && ref.APIVersion == "apps/v1" {
				scalers++
				if a.Spec.MinReplicas == nil || *a.Spec.MinReplicas < 2 {
					problems = append(problems, fmt.Sprintf("HorizontalPodAutoscaler %s/%s: minReplicas below 2 leaves no replica through a disruption", a.Namespace, a.Name))
				}
				if len(a.Spec.Metrics) == 0 {
					problems = append(problems, fmt.Sprintf("HorizontalPodAutoscaler %s/%s has no metrics", a.Namespace, a.Name))
				}
			}
		}
		want := 1
		if singleReplica[component] {
			want = 0
		}
		if scalers != want {
			problems = append(problems, fmt.Sprintf("%s: %d HorizontalPodAutoscalers target it, expected %d", where, scalers, want))
		}
	}
	for _, a := range o.autoscalers {
		ref := a.Spec.ScaleTargetRef
		key := a.Namespace + "/" + ref.Name
		if (ref.Kind == "Deployment" && o.deployments[key] == nil) || (ref.Kind == "StatefulSet" && o.statefulSets[key] == nil) ||
			(ref.Kind != "Deployment" && ref.Kind != "StatefulSet") {
			problems = append(problems, fmt.Sprintf("HorizontalPodAutoscaler %s/%s targets %s %s, which is not rendered", a.Namespace, a.Name, ref.Kind, ref.Name))
		}
	}
	return problems
}
