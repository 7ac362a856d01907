
/*
 * Copyright (C) ratepool authors
 */


/*
 * What the gateway knows of each provider's dialect that is not a
 * header: which request paths are OpenAI's APIs, how its errors are
 * typed there, and which error answers mean "out of money" or "too
 * large for any key" rather than "busy".
 */


#include <string.h>

#include "ratepool_dialect.h"
#include "ratepool_request.h"


static size_t ratepool_utf8_whole(const unsigned char *s, size_t n);
static size_t ratepool_error_text(const unsigned char *body, size_t len,
    unsigned char *out, size_t size, int depth);


/*
 * Whether an error answer says its key's money is spent (a spend cap, a
 * quota, no credit left) rather than that it is busy: such a key is of
 * no use until its billing period turns, however long it cools down.
 * Only the part of the body that has arrived is looked at; the error
 * codes come early in every provider's error object.
 */

static const char  *ratepool_spent_markers[] = {
    "enforced_spend_limit_reached",         /* Anthropic's spend cap */
    "specified API usage limits",           /* Anthropic's own limits, */
    "specified workspace API usage limits", /* as a 400 */
    "credit balance is too low",
    "insufficient_quota",                   /* OpenAI */
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    NULL
};


static int
ratepool_body_says(const unsigned char *body, size_t len,
    const char **markers)
{
    size_t        n, i;
    const char  **m;

    for (m = markers; *m; m++) {
        n = strlen(*m);

        for (i = 0; i + n <= len; i++) {
            if (body[i] == (unsigned char) (*m)[0]
                && memcmp(body + i, *m, n) == 0)
            {
                return 1;
            }
        }
    }

    return 0;
}


int
ratepool_error_spent(int status, const unsigned char *body, size_t len)
{
    if (status == 402) {
        return 1;
    }

    if (status != 429 && status != 400 && status != 403) {
        return 0;
    }

    return ratepool_body_says(body, len, ratepool_spent_markers);
}


/*
 * Whether a 429 says the request alone is larger than its org's limit
 * ("Request too large for gpt-4o in organization ... on tokens per min"):
 * the org is not busy, and a key with the same limit would refuse it too.
 */

static const char  *ratepool_too_large_markers[] = {
    "Request too large for",                /* OpenAI */
    NULL
};


int
ratepool_error_too_large(int status, const unsigned char *body, size_t len)
{
    if (status != 429) {
        return 0;
    }

    return ratepool_body_says(body, len, ratepool_too_large_markers);
}


/*
 * Whether a request path is one of OpenAI's APIs (Chat Completions,
 * Completions, Responses, Embeddings), whose clients expect OpenAI's
 * error objects; every other path gets Anthropic's.  The query string is
 * not looked at.
 */

static const char  *ratepool_openai_paths[] = {
    "/chat/completions",
    "/completions",
    "/responses",
    "/embeddings",
    NULL
};


int
ratepool_openai_path(const unsigned char *uri, size_t len)
{
    size_t        i, n;
    const char  **m;

    for (i = 0; i < len; i++) {
        if (uri[i] == '?') {
            len = i;
            break;
        }
    }

    for (m = ratepool_openai_paths; *m; m++) {
        n = strlen(*m);

        for (i = 0; i + n <= len; i++) {
            if (memcmp(uri + i, *m, n) == 0
                && (i + n == len || uri[i + n] == '/'))
            {
                return 1;
            }
        }
    }

    return 0;
}


/*
 * The gateway's errors, typed the Anthropic way, as OpenAI types and
 * codes them: its clients look at "code" for rate limits and quota.
 */

void
ratepool_openai_error(const char *type, const char *error_code,
    const char **openai_type, const char **openai_code)
{
    *openai_code = NULL;

    if (error_code && strcmp(error_code, "enforced_spend_limit_reached") == 0)
    {
        *openai_type = "insufficient_quota";
        *openai_code = "insufficient_quota";

    } else if (strcmp(type, "rate_limit_error") == 0) {
        *openai_type = "requests";
        *openai_code = "rate_limit_exceeded";

    } else if (strcmp(type, "authentication_error") == 0) {
        *openai_type = "invalid_request_error";
        *openai_code = "invalid_api_key";

    } else if (strcmp(type, "invalid_request_error") == 0
               || strcmp(type, "request_too_large") == 0
               || strcmp(type, "not_found_error") == 0
               || strcmp(type, "permission_error") == 0)
    {
        *openai_type = "invalid_request_error";

    } else {
        *openai_type = "server_error";
    }
}


/*
 * Only the document's own members are looked at: a member nested in
 * another object is not the document's.
 */

int
ratepool_json_top_string(const unsigned char *body, size_t len,
    const char *name, size_t name_len, const unsigned char **from,
    const unsigned char **to)
{
    int                   depth, in_string, escape, is_key, want;
    size_t                key_start;
    unsigned char         c;
    const unsigned char  *p, *end;

    end = body + len;
    depth = 0;
    in_string = 0;
    escape = 0;
    is_key = 0;
    want = 0;
    key_start = 0;

    for (p = body; p < end; p++) {
        c = *p;

        if (in_string) {
            if (escape) {
                escape = 0;

            } else if (c == '\\') {
                escape = 1;

            } else if (c == '"') {
                in_string = 0;

                if (is_key) {
                    want = (depth == 1
                            && (size_t) (p - body) - key_start == name_len
                            && memcmp(body + key_start, name, name_len) == 0);
                }
            }

            continue;
        }

        if (c == '"') {
            if (want && !is_key) {
                break;
            }

            in_string = 1;
            key_start = (size_t) (p + 1 - body);
            continue;
        }

        if (c == '{' || c == '[') {
            depth++;
            is_key = (c == '{');
            want = 0;

        } else if (c == '}' || c == ']') {
            depth--;
            want = 0;

        } else if (c == ',') {
            is_key = 1;
            want = 0;

        } else if (c == ':') {
            is_key = 0;

        } else if (c != ' ' && c != '\t' && c != '\r' && c != '\n') {
            want = 0;       /* a value that is not a string */
        }
    }

    if (p == end) {
        return 0;
    }

    /* p is at the value's opening quote: its end is the closing one */

    *from = ++p;
    escape = 0;

    for ( /* void */ ; p < end; p++) {
        if (escape) {
            escape = 0;

        } else if (*p == '\\') {
            escape = 1;

        } else if (*p == '"') {
            break;
        }
    }

    /* a body cut short: what of the value came */
    *to = p;

    return 1;
}


size_t
ratepool_json_unescape(const unsigned char *from, const unsigned char *to,
    unsigned char *out, size_t size)
{
    size_t                n, i;
    unsigned              v;
    unsigned char         c;
    const unsigned char  *p;

    n = 0;

    for (p = from; p < to && n < size; p++) {
        c = *p;

        if (c == '\\' && p + 1 < to) {
            c = *++p;

            switch (c) {
            case 'n':
                c = '\n';
                break;
            case 'r':
                c = '\r';
                break;
            case 't':
                c = '\t';
                break;
            case 'b':
                c = '\b';
                break;
            case 'f':
                c = '\f';
                break;

            case 'u':
                v = 0;

                for (i = 0; i < 4 && p + 1 < to; i++) {
                    c = *++p;
                    v = v * 16 + (unsigned) (c >= 'a' ? c - 'a' + 10
                                             : c >= 'A' ? c - 'A' + 10
                                             : c - '0');
                }

                c = (v < 0x80) ? (unsigned char) v : '?';
                break;

            default:
                break;      /* \" \\ \/ */
            }
        }

        out[n++] = c;
    }

    if (p < to) {
        n = ratepool_utf8_whole(out, n);
    }

    return n;
}


/* the length of what is left once a UTF-8 character cut short is out */

static size_t
ratepool_utf8_whole(const unsigned char *s, size_t n)
{
    size_t  lead, need;

    lead = n;

    while (lead > 0 && n - lead < 4 && (s[lead - 1] & 0xc0) == 0x80) {
        lead--;
    }

    if (lead == 0 || !(s[lead - 1] & 0x80)) {
        return n;       /* ASCII last, or no lead byte in reach */
    }

    need = (s[lead - 1] >= 0xf0) ? 4 : (s[lead - 1] >= 0xe0) ? 3 : 2;

    return (n - (lead - 1) < need) ? lead - 1 : n;
}


/*
 * An error's text: the document's own "message" (Bedrock's), or that of
 * its "error" object (Google's {"error": {"code", "message", "status"}}),
 * its control characters as spaces.
 */

size_t
ratepool_error_message(const unsigned char *body, size_t len,
    unsigned char *out, size_t size)
{
    return ratepool_error_text(body, len, out, size, 0);
}


static size_t
ratepool_error_text(const unsigned char *body, size_t len,
    unsigned char *out, size_t size, int depth)
{
    int                   n, i;
    size_t                k, got;
    ratepool_member_t     members[32];
    const unsigned char  *p, *end;

    if (!ratepool_json_top_string(body, len, "message", 7, &p, &end)
        && !ratepool_json_top_string(body, len, "Message", 7, &p, &end))
    {
        /* {"error": {...}} one level down, no deeper */
        n = depth ? -1 : ratepool_json_members(body, len, members, 32);

        for (i = 0; i < n; i++) {
            if (members[i].key_len == 5
                && memcmp(body + members[i].start + 1, "error", 5) == 0)
            {
                /* the value, from past its key's quote and colon */
                k = members[i].start + 7;

                while (k < members[i].end && body[k] != '{') {
                    k++;
                }

                return ratepool_error_text(body + k, members[i].end - k,
                                           out, size, depth + 1);
            }
        }

        return 0;
    }

    got = ratepool_json_unescape(p, end, out, size);

    for (k = 0; k < got; k++) {
        if (out[k] < 0x20) {
            out[k] = ' ';
        }
    }

    return got;
}


const char *
ratepool_error_type(int status)
{
    switch (status) {
    case 400:
        return "invalid_request_error";
    case 401:
        return "authentication_error";
    case 403:
        return "permission_error";
    case 404:
        return "not_found_error";
    case 413:
        return "request_too_large";
    case 429:
        return "rate_limit_error";
    case 503:
    case 529:
        return "overloaded_error";
    case 504:
        return "timeout_error";
    default:
        return status < 500 ? "invalid_request_error" : "api_error";
    }
}
