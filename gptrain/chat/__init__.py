"""Chat: the conversation format, conversation datasets, supervised fine-tuning, and the terminal and web chats."""
