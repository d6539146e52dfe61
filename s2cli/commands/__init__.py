"""The `s2` commands, one module each; `s2cli.cli` assembles them into the app. Every command parses its options,
makes one call into the library and prints the result: progress and logs on stderr, results and --json on
stdout, an S2Error as one line on stderr with its exit code (`_common.reported`)."""
