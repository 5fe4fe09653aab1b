"""batchops' tests. Every test folder is a package, so that test modules in different folders
may share a basename and shared code imports as ``tests.helpers``."""
