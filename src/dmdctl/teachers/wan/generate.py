"""Text-to-video with a distilled Wan generator: decoded videos, mp4 files, PNG strips."""
