"""Samplers as plain functions: noise schedules, Gaussian paths, solvers, guidance, relay diffusion."""
