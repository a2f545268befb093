"""Importing ``retrieval`` first lets its public face import eagerly from here without a cycle,
whichever package a program imports first."""

import retrieval  # noqa: F401
