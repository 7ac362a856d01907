
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

/* the gateway's error type and code, as OpenAI's clients read them */
void ratepool_openai_error(const char *type, const char *error_code,
    const char **openai_type, const char **openai_code);


#endif /* _RATEPOOL_DIALECT_H_INCLUDED_ */
