"""Tests of Fresco's clients: the Python client (installed alone into a clean virtualenv, and its calls against
real services) and the clients in other languages, each against services started as real processes."""
