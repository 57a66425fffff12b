"""Company knowledge: documents in, cited passages out, each department seeing only its own."""
