"""Results of a run: verdicts, autopkgtest's result lines and exit code, JSON and JUnit files."""
