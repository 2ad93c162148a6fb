"""Margin-based softmax (face-recognition family) losses over normalised class weights."""

from __future__ import annotations
