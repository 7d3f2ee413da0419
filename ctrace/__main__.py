from ctrace.cli import run

run()
