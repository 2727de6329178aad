"""POST /tokenize's chat form takes `tools`, which reach the chat template as in chat
completions: the tokens are those of the prompt a chat request with them would run."""

from jaxserve.testing.tokenizer import CHAT_TEMPLATE

TOOLS_TEMPLATE = ("{% if tools %}{{ '<|im_start|>system\\nTools:' }}{% for tool in tools %}"
                  "{{ ' ' + tool.function.name }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
                  + CHAT_TEMPLATE)
TOOL = {"type": "function", "function": {"name": "roll_dice", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_tools_reach_the_template_of_the_chat_form(scripted):
    async def test(client, engine):
        answers = []
        for body in ({"messages": MESSAGES}, {"messages": MESSAGES, "tools": [TOOL]},
                     {"messages": MESSAGES, "tools": [{"type": "function"}]},
                     {"prompt": "Hi", "tools": [TOOL]}):
            response = await client.post("/tokenize", json=body)
            answers.append((response.status, await response.json()))
        return answers

    (status, plain), (status_tools, with_tools), (status_bad, bad), (status_prompt, prompt) = (
        scripted.serve(
        test, app_kwargs={"chat_template": TOOLS_TEMPLATE}))
    assert status == status_tools == 200, (plain, with_tools)
    text = scripted.tokenizer.decode(with_tools["tokens"])
    assert "Tools: roll_dice" in text and "Tools" not in scripted.tokenizer.decode(
        plain["tokens"])
    assert with_tools["tokens"][-len(plain["tokens"]):] == plain["tokens"]
    assert status_bad == 400 and "tools" in bad["error"]["message"]
    assert status_prompt == 400 and "tools go with messages" in prompt["error"]["message"]
