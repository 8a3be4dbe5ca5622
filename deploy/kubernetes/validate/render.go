package main

import (
	"errors"
	"fmt"
	"sort"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// workload is a Deployment's or StatefulSet's pod template with where it runs.
type workload struct {
	kind, namespace, name string
	labels                map[string]string // the pod template's
	spec                  *corev1.PodSpec
	podAnnotations        map[string]string
	claimTemplates        []string // a StatefulSet's volumeClaimTemplates, volumes of each pod
}

// objects holds one overlay's rendered objects, decoded.
type objects struct {
	rendered     []byte   // the overlay's objects as kustomize renders them, YAML
	all          []string // kind/namespace/name of every object
	workloads    []workload
	services     []*corev1.Service
	policies     []*networkingv1.NetworkPolicy
	budgets      []*policyv1.PodDisruptionBudget
	autoscalers  []*autoscalingv2.HorizontalPodAutoscaler
	configMaps   map[string]bool // namespace/name
	secrets      map[string]bool
	claims       map[string]bool
	namespaces   map[string]map[string]string // name -> labels
	deployments  map[string]*appsv1.Deployment
	statefulSets map[string]*appsv1.StatefulSet
}

type header struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"metadata"`
}

// renderAndDecode builds the kustomization in dir with kustomize's own API and decodes every object
// strictly (unknown or duplicate fields fail) into the k8s.io/api type of its apiVersion and kind.
func renderAndDecode(dir string) (*objects, []string) {
	kustomizer := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	resources, err := kustomizer.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, []string{fmt.Sprintf("kustomize build: %v", err)}
	}
	out := &objects{
		configMaps: map[string]bool{}, secrets: map[string]bool{}, claims: map[string]bool{},
		namespaces: map[string]map[string]string{}, deployments: map[string]*appsv1.Deployment{},
		statefulSets: map[string]*appsv1.StatefulSet{},
	}
	var problems []string
	if out.rendered, err = resources.AsYaml(); err != nil {
		return nil, []string{fmt.Sprintf("kustomize build: %v", err)}
	}
	for _, resource := range resources.Resources() {
		raw, err := resource.AsYAML()
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", resource.CurId(), err))
			continue
		}
		if err := out.decode(raw); err != nil {
			problems = append(problems, err.Error())
		}
	}
	sort.Strings(out.all)
	return out, problems
}

// strict decodes as the API server does: field names case-sensitive (encoding/json alone would take
// readOnlyRootFileSystem for readOnlyRootFilesystem), unknown and duplicate fields refused.
func strict(raw []byte, h header, into any) error {
	if err := decodeStrict(raw, into); err != nil {
		return fmt.Errorf("%s %s/%s does not decode strictly into %T: %v", h.Kind, h.Metadata.Namespace, h.Metadata.Name, into, err)
	}
	return nil
}

func decodeStrict(raw []byte, into any) error {
	asJSON, err := yaml.YAMLToJSONStrict(raw)
	if err != nil {
		return err
	}
	strictErrors, err := kjson.UnmarshalStrict(asJSON, into, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strictErrors...)
}

func (o *objects) decode(raw []byte) error {
	var h header
	if err := yaml.Unmarshal(raw, &h); err != nil {
		return fmt.Errorf("not an object: %v", err)
	}
	key := h.Metadata.Namespace + "/" + h.Metadata.Name
	o.all = append(o.all, h.Kind+"/"+key)
	switch h.APIVersion + " " + h.Kind {
	case "v1 Namespace":
		var ns corev1.Namespace
		if err := strict(raw, h, &ns); err != nil {
			return err
		}
		labels := map[string]string{"kubernetes.io/metadata.name": ns.Name}
		for k, v := range ns.Labels {
			labels[k] = v
		}
		o.namespaces[ns.Name] = labels
	case "v1 Service":
		var s corev1.Service
		if err := strict(raw, h, &s); err != nil {
			return err
		}
		o.services = append(o.services, &s)
	case "v1 ConfigMap":
		if err := strict(raw, h, &corev1.ConfigMap{}); err != nil {
			return err
		}
		o.configMaps[key] = true
	case "v1 Secret":
		if err := strict(raw, h, &corev1.Secret{}); err != nil {
			return err
		}
		o.secrets[key] = true
	case "v1 ServiceAccount":
		return strict(raw, h, &corev1.ServiceAccount{})
	case "v1 PersistentVolumeClaim":
		if err := strict(raw, h, &corev1.PersistentVolumeClaim{}); err != nil {
			return err
		}
		o.claims[key] = true
	case "apps/v1 Deployment":
		var d appsv1.Deployment
		if err := strict(raw, h, &d); err != nil {
			return err
		}
		o.deployments[key] = &d
		o.workloads = append(o.workloads, workload{"Deployment", d.Namespace, d.Name, d.Spec.Template.Labels, &d.Spec.Template.Spec, d.Spec.Template.Annotations, nil})
		if d.Spec.Selector == nil || !selects(d.Spec.Selector, d.Spec.Template.Labels) {
			return fmt.Errorf("Deployment %s: its selector does not match its own pod template", key)
		}
	case "apps/v1 StatefulSet":
		var s appsv1.StatefulSet
		if err := strict(raw, h, &s); err != nil {
			return err
		}
		o.statefulSets[key] = &s
		var templates []string
		for _, claim := range s.Spec.VolumeClaimTemplates {
			templates = append(templates, claim.Name)
		}
		o.workloads = append(o.workloads, workload{"StatefulSet", s.Namespace, s.Name, s.Spec.Template.Labels, &s.Spec.Template.Spec, s.Spec.Template.Annotations, templates})
		if s.Spec.Selector == nil || !selects(s.Spec.Selector, s.Spec.Template.Labels) {
			return fmt.Errorf("StatefulSet %s: its selector does not match its own pod template", key)
		}
	case "policy/v1 PodDisruptionBudget":
		var b policyv1.PodDisruptionBudget
		if err := strict(raw, h, &b); err != nil {
			return err
		}
		o.budgets = append(o.budgets, &b)
	case "autoscaling/v2 HorizontalPodAutoscaler":
		var a autoscalingv2.HorizontalPodAutoscaler
		if err := strict(raw, h, &a); err != nil {
			return err
		}
		o.autoscalers = append(o.autoscalers, &a)
	case "networking.k8s.io/v1 NetworkPolicy":
		var p networkingv1.NetworkPolicy
		if err := strict(raw, h, &p); err != nil {
			return err
		}
		o.policies = append(o.policies, &p)
	default:
		return fmt.Errorf("%s %s (%s): no Kubernetes type is known here for this kind; add it to the validator", h.Kind, key, h.APIVersion)
	}
	return nil
}
