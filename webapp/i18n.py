"""UI text in Chinese and English. Static labels follow the browser's language through
Gradio's i18n (switchable in the footer's Settings); messages built on the server carry
both languages, since the server does not know the browser's choice."""

from __future__ import annotations

import gradio as gr

EN = {
    "app_title": "hangjia · your company's assistant",
    "tab_chat": "Chat",
    "tab_review": "Review",
    "tab_admin": "Admin",
    "new_conversation": "➕ New conversation",
    "your_conversations": "Your conversations",
    "chatbot": "hangjia",
    "placeholder": "Ask a question… (Enter to send, Shift+Enter for a new line)",
    "send": "Send",
    "comment_label": "What was wrong with this answer? (optional)",
    "send_comment": "Send comment",
    "logout": "Log out",
    "approve": "✅ Approve",
    "decline": "🚫 Decline",
    "review_rating": "Cases",
    "review_department": "Department",
    "review_version": "Adapter version",
    "review_since": "From (date)",
    "review_until": "To (date)",
    "review_with_comment": "With comment only",
    "review_answer": "Corrected answer",
    "review_tool": "Tool the model should have called",
    "review_arguments": "Tool arguments (JSON)",
    "review_reason": "Reason (Alt+1 … Alt+8)",
    "review_note": "Note (optional)",
    "review_approve": "✅ Approve (Alt+A)",
    "review_reject": "🚫 Not a model error (Alt+R)",
    "review_skip": "⏭ Skip (Alt+S)",
    "samples_title": "Training samples: export / import",
    "samples_export": "Export JSONL",
    "samples_import_file": "JSONL file to import",
    "samples_import": "Import",
    "refresh": "Refresh",
    "admin_force": "Ignore the new-sample threshold",
    "admin_retrain": "🔁 Retrain now",
    "admin_cancel": "Cancel",
    "admin_gate": "Evaluation gate: candidate vs active",
    "admin_versions": "Adapter versions",
    "admin_version": "Version",
    "admin_promote": "Promote / roll back to this version",
    "admin_canary_share": "Canary share",
    "admin_canary": "Set canary",
    "admin_feedback": "Thumbs-down rate per adapter version",
    "admin_runs": "Training runs",
    "knowledge_title": "📚 Company knowledge",
    "knowledge_files": "Documents (txt, md, pdf, docx; several at once)",
    "knowledge_readers": "Who may read them",
    "knowledge_add": "Add / replace",
    "knowledge_documents": "Documents",
    "knowledge_document_id": "Document id",
    "knowledge_delete": "🗑 Delete document",
    "attach": "Attach a document",
    "ask_fresh": "🔄 Ask the model afresh",
    "cache_title": "⚡ Response cache",
    "cache_enabled": "Cache on",
    "cache_semantic": "Serve paraphrases (semantic layer)",
    "cache_threshold": "Similarity threshold",
    "cache_save": "Save",
    "cache_clear": "🗑 Clear the cache",
    "monitoring_title": "📈 Monitoring",
    "monitoring_period": "Period",
    "monitoring_daily": "Per day and department",
    "monitoring_backlog": "Review queue (open thumbs-down cases)",
    "audit_title": "🔎 Audit (your department's conversations; every search is logged)",
    "audit_user": "User",
    "audit_since": "From (date)",
    "audit_until": "To (date)",
    "audit_text": "Text contains",
    "audit_tool": "Tool",
    "audit_rating": "Rating",
    "audit_search": "Search",
    "audit_conversation": "Conversation id",
    "audit_open": "Open",
    "audit_format": "Format",
    "audit_export": "Export",
    "audit_record": "Conversation: messages, tool actions, retrieved passages",
    "audit_file": "Exported file",
    "keys_title": "🔑 API keys (OpenAI-compatible API)",
    "keys_help": "Programs call hangjia at `/v1` with the official `openai` client and one of your keys; "
                 "they get exactly what you get here. The key is shown once.",
    "keys_name": "Name of the new key",
    "keys_create": "Create key",
    "keys_id": "Key id",
    "keys_revoke": "Revoke",
    "keys_new": "Your new key (copy it now)",

}

ZH = {
    "app_title": "行家 · 公司专属助手",
    "tab_chat": "对话",
    "tab_review": "审核",
    "tab_admin": "管理",
    "new_conversation": "➕ 新对话",
    "your_conversations": "我的对话",
    "chatbot": "行家",
    "placeholder": "请输入问题……（回车发送，Shift+回车换行）",
    "send": "发送",
    "comment_label": "这个回答哪里不对？（可选）",
    "send_comment": "提交意见",
    "logout": "退出登录",
    "approve": "✅ 批准",
    "decline": "🚫 拒绝",
    "review_rating": "案例",
    "review_department": "部门",
    "review_version": "适配器版本",
    "review_since": "起始日期",
    "review_until": "截止日期",
    "review_with_comment": "仅看有评论的",
    "review_answer": "修正后的回答",
    "review_tool": "模型应调用的工具",
    "review_arguments": "工具参数（JSON）",
    "review_reason": "原因 (Alt+1 … Alt+8)",
    "review_note": "备注（可选）",
    "review_approve": "✅ 通过 (Alt+A)",
    "review_reject": "🚫 非模型错误 (Alt+R)",
    "review_skip": "⏭ 跳过 (Alt+S)",
    "samples_title": "训练样本：导出 / 导入",
    "samples_export": "导出 JSONL",
    "samples_import_file": "要导入的 JSONL 文件",
    "samples_import": "导入",
    "refresh": "刷新",
    "admin_force": "忽略新样本数量门槛",
    "admin_retrain": "🔁 立即重新训练",
    "admin_cancel": "取消",
    "admin_gate": "评估门槛：候选版本 vs 当前版本",
    "admin_versions": "适配器版本",
    "admin_version": "版本",
    "admin_promote": "上线 / 回滚到此版本",
    "admin_canary_share": "灰度比例",
    "admin_canary": "设置灰度",
    "admin_feedback": "各适配器版本的点踩率",
    "admin_runs": "训练记录",
    "knowledge_title": "📚 公司知识库",
    "knowledge_files": "文档（txt、md、pdf、docx，可多选）",
    "knowledge_readers": "可阅读的部门",
    "knowledge_add": "添加 / 替换",
    "knowledge_documents": "文档",
    "knowledge_document_id": "文档编号",
    "knowledge_delete": "🗑 删除文档",
    "attach": "附加文档",
    "ask_fresh": "🔄 重新让模型回答",
    "cache_title": "⚡ 回答缓存",
    "cache_enabled": "启用缓存",
    "cache_semantic": "相似问题也使用缓存（语义层）",
    "cache_threshold": "相似度阈值",
    "cache_save": "保存",
    "cache_clear": "🗑 清空缓存",
    "monitoring_title": "📈 运行监控",
    "monitoring_period": "时间范围",
    "monitoring_daily": "按天、按部门",
    "monitoring_backlog": "审核队列（未处理的点踩）",
    "audit_title": "🔎 审计（本部门会话；每次查询都会被记录）",
    "audit_user": "用户",
    "audit_since": "开始日期",
    "audit_until": "结束日期",
    "audit_text": "包含文字",
    "audit_tool": "工具",
    "audit_rating": "评价",
    "audit_search": "查询",
    "audit_conversation": "会话编号",
    "audit_open": "打开",
    "audit_format": "格式",
    "audit_export": "导出",
    "audit_record": "会话：消息、工具操作、检索到的段落",
    "audit_file": "导出的文件",
    "keys_title": "🔑 API 密钥（兼容 OpenAI 的接口）",
    "keys_help": "程序可用官方 `openai` 客户端和您的密钥调用 `/v1`，得到的与您在此处得到的完全相同。密钥只显示一次。",
    "keys_name": "新密钥的名称",
    "keys_create": "创建密钥",
    "keys_id": "密钥编号",
    "keys_revoke": "吊销",
    "keys_new": "新密钥（请立即复制）",

}

# Server-side messages: (Chinese, English) by code; params fill {placeholders}.
MESSAGES = {
    "empty_message": ("消息为空，请先输入问题。", "The message is empty: type a question first."),
    "message_too_long": (
        "消息有 {length:,} 个字符，上限是 {limit:,}。请缩短或分成几条发送。",
        "The message has {length:,} characters; the limit is {limit:,}. Shorten it or split it.",
    ),
    "context_overflow": (
        "消息约 {tokens:,} 个词元，模型每轮最多读取 {budget:,} 个。请缩短。",
        "The message is about {tokens:,} tokens; the model reads at most {budget:,} per turn. Shorten it.",
    ),
    "storage_failed": ("服务器无法保存（{reason}）。", "The server could not save ({reason})."),
    "not_found": ("没有找到这个对话。", "That conversation was not found among yours."),
    "not_allowed": ("您没有权限执行此操作。", "You are not allowed to do this."),
    "generation_failed": ("模型回答时出错，请重试；若持续出错请联系管理员。",
                          "The model failed while answering. Try again; if it keeps failing, tell your admin."),
    "feedback_saved_up": ("感谢反馈 👍", "Thanks for the feedback 👍"),
    "feedback_saved_down": ("已记录 👎，可在下方补充说明。", "Recorded 👎 — add a comment below if you like."),
    "comment_saved": ("意见已提交，谢谢！", "Comment saved, thank you!"),
    "nothing_to_approve": ("没有等待批准的操作。", "No action is waiting for your approval."),
    "pending_action": ("有操作在等待您批准，请先批准或拒绝。", "An action waits for your approval: approve or decline it first."),
    "answer_in_progress": ("回答还在生成，请稍候再评价。", "The answer is still being written; rate it when it is finished."),
    "nothing_to_rate": ("只能评价助手的回答。", "Only the assistant's answers can be rated."),
    "input_invalid": ("请求中有一个值无法使用（数字或日期格式不对？），请检查后重试。（编号 {ref}）",
                      "A value in the request is not what this needs (a number or a date in the wrong form?)."
                      " Check it and try again. (ref {ref})"),
    "server_error": ("服务器出错，已记录。请重试；若持续出错，请把编号告诉管理员。（编号 {ref}）",
                     "Something went wrong on the server; it was logged. Try again, and if it keeps failing,"
                     " give your admin the reference. (ref {ref})"),
    "rating_invalid": ("评分只能是 1（👍）或 -1（👎），收到的是 {value}。",
                       "A rating is 1 (thumbs up) or -1 (thumbs down); this was {value}."),
    "file_not_yours": ("只能使用您在本次登录中上传的文件，请重新上传。",
                       "Only files you uploaded in this login session can be used; upload the file again."),
    "attachment_unreadable": ("附件无法读取：{reason}", "The attachment cannot be read: {reason}"),
    "attachment_whole": ("📎 {name}（约 {tokens:,} 个词元）已完整提供给模型。",
                         "📎 {name} (about {tokens:,} tokens) was given to the model whole."),
    "answer_copied_tools": (
        "✂️ 回答已截断：模型把工具的定义抄了回来，而不是回答。可以换个问法再问，或点 👎 让审核员纠正。",
        "✂️ The answer was cut: the model copied the tools' definitions back instead of answering. Ask again in "
        "other words, or press 👎 so a reviewer corrects it.",
    ),
    "answer_cut": (
        "✂️ 回答已截断：模型开始重复自己（重复的内容或层层嵌套的 JSON）。可以换个问法再问，或点 👎 让审核员纠正。",
        "✂️ The answer was cut: the model began repeating itself (repeated text or nested JSON). Ask again in "
        "other words, or press 👎 so a reviewer corrects it.",
    ),
    "attachment_passages_relevant": (
        "📎 {name} 约 {tokens:,} 个词元，超出模型本轮可读的 {budget:,} 个。已改用检索：只提供与问题最相关的 "
        "{passages}/{total} 个段落，回答可能遗漏其余内容。",
        "📎 {name} is about {tokens:,} tokens, more than the {budget:,} the model can read now. Fell back to "
        "retrieval: the model saw the {passages} of {total} passages most related to your question, not the rest."),
    "attachment_passages_spread": (
        "📎 {name} 约 {tokens:,} 个词元，超出模型本轮可读的 {budget:,} 个。问题与具体段落关联不强（如“总结一下”），"
        "已从全文均匀选取 {passages}/{total} 个段落，摘要可能不完整。",
        "📎 {name} is about {tokens:,} tokens, more than the {budget:,} the model can read now. Your question "
        "points to no particular passage (as for a summary), so the model saw {passages} of {total} passages "
        "spread evenly through it; the summary may miss parts."),
    "knowledge_no_departments": ("请选择可阅读这些文档的部门，或设为全公司可见。",
                                 "Choose the departments that may read these documents, or make them company-wide."),
}


# Values and column names of the tables built on the server (the admin's and monitoring's):
# shown in both languages, Chinese first, as the server's messages are.
TERMS = {
    "schedule": ("夜间", "nightly"), "manual": ("手动", "manual"), "cli": ("命令行", "command line"),
    "running": ("⏳ 进行中", "running"), "succeeded": ("✅ 成功", "succeeded"), "failed": ("❌ 失败", "failed"),
    "cancelled": ("🚫 已取消", "cancelled"), "skipped": ("⏭ 跳过", "skipped"),
    "candidate": ("候选", "candidate"), "active": ("✅ 在用", "active"), "retired": ("已退役", "retired"),
    "rejected": ("❌ 未通过", "rejected"), "base": ("基础模型", "base model"),
    "tool_exact": ("工具调用准确", "tool calls exact"), "keyword_recall": ("要点召回", "keyword recall"),
    "tool_format_valid": ("调用格式有效", "call format valid"), "no_false_tool_calls": ("无误调用", "no false calls"),
    "general_recall": ("通用能力", "general recall"),
    "ok": ("✅ 成功", "ok"), "error": ("❌ 出错", "error"), "denied": ("⛔ 无权限", "denied"),
    "invalid": ("⚠️ 无效", "invalid"), "timeout": ("⏱️ 超时", "timeout"), "declined": ("🚫 已拒绝", "declined"),
    "pending": ("⏳ 待批准", "pending"),
}
REASONS = [  # the refresh's and the gate's reasons, English pattern -> Chinese
    (r"(\d+) new approved samples since the last refresh; (\d+) are needed", r"自上次训练以来新增 \1 条已审核样本，需要 \2 条"),
    (r"no approved training samples yet", "还没有已审核的训练样本"),
    (r"domain metrics improved by ([-+.\d]+), less than the margin ([.\d]+)", r"领域指标提升 \1，低于要求的 \2"),
    (r"(\w+) fell by ([.\d]+), more than (?:the tolerance|its noise) ([.\d]+)",
     lambda m: f"{_zh_term(m.group(1))} 下降 {m.group(2)}，超过允许的 {m.group(3)}"),
]


def _zh_term(code: str) -> str:
    zh = TERMS.get(code, (code, code))[0]
    return zh.split(" ", 1)[-1] if zh[:1] in "✅❌⏳🚫⏭⚠⏱⛔" else zh


# Column names of the server's tables, as people read them (values of *_rate become percentages).
COLUMNS = {
    "day": "日期 day", "department_id": "部门 department", "conversations": "对话 conversations",
    "user_messages": "提问 questions", "active_users": "活跃用户 active users", "answers": "回答 answers",
    "latency_p50_ms": "延迟中位 p50 ms", "latency_p95_ms": "延迟 p95 ms", "prompt_tokens": "输入词元 prompt tokens",
    "completion_tokens": "输出词元 completion tokens", "errors": "错误 errors", "thumbs_up": "👍", "thumbs_down": "👎",
    "cache_lookups": "缓存查询 cache lookups", "cache_hits": "缓存命中 cache hits", "cache_hit_rate": "命中率 hit rate",
    "open_cases": "待审 open cases", "oldest_hours": "最久等待（小时）oldest (hours)", "status": "状态 status",
    "runs": "次数 runs", "seconds": "秒 seconds", "conversation_id": "会话 conversation", "created_at": "创建 created",
    "username": "用户 user", "title": "标题 title", "messages": "消息 messages", "tool_calls": "工具调用 tool calls",
    "id": "# 编号", "name": "名称 name", "key_prefix": "密钥开头 key starts", "last_used_at": "最近使用 last used",
    "revoked_at": "吊销 revoked", "version": "版本 version", "rated": "已评价 rated",
    "thumbs_down_rate": "👎 比例 rate", "entries": "条目 entries", "lookups": "查询 lookups",
    "exact_hits": "原句命中 exact hits", "semantic_hits": "近义命中 paraphrase hits", "guarded": "被拦下 guarded",
    "hit_rate": "命中率 hit rate", "saved_s": "节省秒数 saved s", "saved_tokens": "节省词元 saved tokens",
    "avg_lookup_ms": "查询耗时 lookup ms", "source_name": "文件 file", "readers": "可读部门 readers",
    "chunks": "段落 passages", "chars": "字数 characters", "updated_at": "更新 updated",
}


MINUTE = "%Y-%m-%d %H:%M"  # times in people's tables


def percent(value: object) -> str:
    """A share as people read it: '57%' ('' for none)."""
    return "" if value is None or value != value else f"{float(value):.0%}"


def minute(value) -> str:
    """A time to the minute ('' for none)."""
    return value.strftime(MINUTE) if value is not None else ""


def for_people(table):
    """A server table (pandas) with its columns named in both languages, rates as
    percentages, statuses as terms and times to the minute."""
    table = table.copy()
    for column in table.columns:
        if column.endswith("_rate"):
            table[column] = [percent(v) for v in table[column]]
        elif column == "status":
            table[column] = [term(v) for v in table[column]]
        elif str(table[column].dtype).startswith("datetime"):
            table[column] = table[column].dt.strftime(MINUTE).fillna("")
        elif table[column].dtype.kind == "f" and table[column].isna().any():  # nothing to average yet
            table[column] = ["" if v != v else v for v in table[column]]
    return table.rename(columns=COLUMNS)


def term(code: object) -> str:
    """A status, trigger or metric as people read it: '✅ 成功 succeeded'."""
    zh, en = TERMS.get(str(code), (None, None))
    return f"{zh} {en}" if zh else ("" if code is None else str(code))


def reason_text(reason: str | None) -> str:
    """A refresh's or gate's reason in both languages (as it was recorded, in English, when
    no Chinese wording is known for it)."""
    import re

    if not reason:
        return ""
    translated = reason
    for pattern, zh in REASONS:
        translated = re.sub(pattern, zh, translated)
    if translated == reason:
        return reason
    return f"{translated.replace('; ', '；')}（{reason}）"


def bilingual(code: str, **params: object) -> str:
    zh, en = MESSAGES[code]
    return f"{zh.format(**params)} / {en.format(**params)}"


def build_i18n() -> gr.I18n:
    return gr.I18n(**{"en": EN, "zh": ZH, "zh-CN": ZH, "zh-TW": ZH})
