"""Samplers, text-to-image pipelines, images, contact sheets and prompt lists."""
