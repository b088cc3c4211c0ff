// compose-check loads a compose file with compose-go, the loader Docker Compose itself is built on:
// the compose specification's schema, variable interpolation from this process's environment
// (a required variable that is unset is an error), merge keys and profiles. It prints the resolved
// project as JSON, so that the file is checked here without a Docker engine.
//
//	go run ./deploy/compose-check docker-compose.yaml [profile ...]
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-check FILE [PROFILE ...]")
		os.Exit(2)
	}
	options, err := cli.NewProjectOptions([]string{os.Args[1]}, cli.WithOsEnv, cli.WithName("fraud-nightly"),
		cli.WithProfiles(os.Args[2:]))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	resolved, err := project.MarshalJSON()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Println(string(resolved))
}
