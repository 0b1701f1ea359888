"""Fused op kinds produced by the fusion passes; each reference composes the unfused ones."""
