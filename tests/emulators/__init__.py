"""Emulators of the outside services animabot talks to, run on 127.0.0.1 inside the tests."""
