
/*
 * Copyright (C) ratepool authors
 */


#ifndef _RATEPOOL_DIALECT_H_INCLUDED_
#define _RATEPOOL_DIALECT_H_INCLUDED_


#include <stddef.h>


/* whether an error answer says the key's money is spent */
int ratepool_error_spent(int status, const unsigned char *body, size_t len);

/* whether a 429 says the request alone is larger than its org's limit */
int ratepool_error_too_large(int status, const unsigned char *body,
    size_t len);

/* whether a request path is one of OpenAI's APIs */
int ratepool_openai_path(const unsigned char *uri, size_t len);

/*
 * The text of a cloud's error answer: the top-level "message" (or
 * "Message") string of a JSON body such as Bedrock's, or its "error"
 * object's (Google's), decoded into out
 * (at most size bytes, cut at a character); returns its length, 0 if
 * there is none.
 */
size_t ratepool_error_message(const unsigned char *body, size_t len,
    unsigned char *out, size_t size);

/*
 * Where a JSON document's own member "name" has a string value: [*from,
 * *to) between its quotes (or to the end of a document cut short),
 * escapes as they are.  Returns 1, or 0.
 */
int ratepool_json_top_string(const unsigned char *body, size_t len,
    const char *name, size_t name_len, const unsigned char **from,
    const unsigned char **to);

/*
 * A JSON string's content, [from, to) between its quotes, decoded into
 * out (at most size bytes, cut at a character); \\u escapes beyond ASCII
 * become "?".  Returns the length.
 */
size_t ratepool_json_unescape(const unsigned char *from,
    const unsigned char *to, unsigned char *out, size_t size);

/* Anthropic's error type for a status */
const char *ratepool_error_type(int status);

/* the gateway's error type and code, as OpenAI's clients read them */
void ratepool_openai_error(const char *type, const char *error_code,
    const char **openai_type, const char **openai_code);


#endif /* _RATEPOOL_DIALECT_H_INCLUDED_ */
