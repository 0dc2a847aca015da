"""nestbed: a DEP-8 test runner with first-class nested testbeds."""
