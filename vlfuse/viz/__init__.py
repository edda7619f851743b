"""Pictures: attention maps over an image, contact sheets of search results."""
