package main

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"

	"github.com/moby/buildkit/frontend/dockerfile/parser"
)

var (
	pipInstall    = regexp.MustCompile(`\bpip3? install\b`)
	shellCommands = regexp.MustCompile(`&&|\|\||;|\|`)
	constrained   = regexp.MustCompile(`(^|\s)(-c|--constraint)(\s+|=)\S*constraints\.txt\b`)
)

// checkDockerfile parses the Dockerfile with BuildKit's own parser and checks what no Docker engine
// here can: base images pinned, every pip install held to constraints.txt, and the final stage
// running as a numeric non-root user (Kubernetes' runAsNonRoot can only verify a numeric one).
func checkDockerfile(path string) []string {
	file, err := os.Open(path)
	if err != nil {
		return []string{err.Error()}
	}
	defer file.Close()
	result, err := parser.Parse(file)
	if err != nil {
		return []string{fmt.Sprintf("does not parse: %v", err)}
	}
	var problems []string
	stages, pips := 0, 0
	finalUser := ""
	for _, node := range result.AST.Children {
		var args []string
		for next := node.Next; next != nil; next = next.Next {
			args = append(args, next.Value)
		}
		line := fmt.Sprintf("line %d", node.StartLine)
		switch strings.ToLower(node.Value) {
		case "from":
			stages++
			finalUser = ""
			if len(args) == 0 {
				problems = append(problems, line+": FROM without an image")
				break
			}
			image := args[0]
			if image != "scratch" && !strings.Contains(image, "@sha256:") {
				tag := ""
				if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
					tag = image[i+1:]
				}
				if tag == "" || tag == "latest" {
					problems = append(problems, fmt.Sprintf("%s: base image %s is not pinned to a version", line, image))
				}
			}
		case "run":
			// Each command of the shell line on its own: one constrained pip must not cover another.
			for _, command := range shellCommands.Split(strings.Join(args, " "), -1) {
				if pipInstall.MatchString(command) {
					pips++
					if !constrained.MatchString(command) {
						problems = append(problems, fmt.Sprintf("%s: pip install without -c constraints.txt: %s", line, strings.TrimSpace(command)))
					}
				}
			}
		case "user":
			if len(args) > 0 {
				finalUser = args[0]
			}
		}
	}
	if stages == 0 {
		problems = append(problems, "no FROM")
	}
	if pips == 0 {
		problems = append(problems, "no pip install: the image would not hold Fresco")
	}
	uid := strings.SplitN(finalUser, ":", 2)[0]
	if n, err := strconv.Atoi(uid); err != nil || n == 0 {
		problems = append(problems, fmt.Sprintf("the final stage's USER is %q: expected a numeric non-root uid", finalUser))
	}
	return problems
}
