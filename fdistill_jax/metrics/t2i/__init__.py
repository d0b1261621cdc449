"""Text-to-image measures: FID under the COCO protocol, CLIP score, DINO diversity."""
