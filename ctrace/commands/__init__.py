"""One module per ctrace command; each defines `command` (a click command). Commands
are thin: they parse options, call the library and return an ExitStatus."""
