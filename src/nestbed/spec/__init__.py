"""DEP-8 test descriptions: parsing debian/tests/control into TestSpec values."""
