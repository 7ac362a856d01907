#!/usr/bin/perl

# The gateway answers a client in the dialect it speaks: OpenAI's error
# object on OpenAI's paths (Chat Completions, Responses, ...), Anthropic's
# everywhere else.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-mock-openai-' . int(rand(1e9));
my $TOKEN = 'gw-dialect-' . int(rand(1e9));

$t->start_mock(port => 1);

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream gpt {
        ratepool zone=llm;
        ratepool_key o1 org=oo provider=openai server=127.0.0.1:%%PORT_1%%
                     key=$KEY;
    }

    ratepool_workspace team rpm=1 daily_tokens=100;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;
        client_max_body_size 1k;

        location /v1/ {
            ratepool_pass http://gpt;
        }
    }
}
EOF

$t->run;

sub ask {
    my (%args) = @_;
    my $r = $t->http(port => $t->port(0), method => 'POST',
        path => $args{path},
        headers => [ $args{token} ? (Authorization => "Bearer $args{token}")
                                  : () ],
        body => $args{body} // { model => 'gpt-4o-mini',
                                 messages => [ { role => 'user',
                                                 content => 'Hi' } ] });
    $r->{json} = eval { decode_json($r->{body}) } || {};
    return $r;
}

my $r = ask(path => '/v1/chat/completions', token => 'wrong');
is($r->{status}, 401, 'an unknown token on Chat Completions: 401');
is($r->{json}{error}{code}, 'invalid_api_key',
    'with OpenAI\'s code for it');
is($r->{json}{error}{type}, 'invalid_request_error', 'and type');
ok(exists $r->{json}{error}{param} && !defined $r->{json}{error}{param},
    'and a null param, as OpenAI sends');
like($r->{json}{error}{message}, qr/invalid gateway token/,
    'saying what is wrong');
ok(!exists $r->{json}{type}, 'not Anthropic\'s envelope');

$r = ask(path => '/v1/messages', token => 'wrong');
is($r->{json}{type}, 'error', 'the same on Messages is Anthropic\'s');
is($r->{json}{error}{type}, 'authentication_error',
    'with Anthropic\'s type');

# (the mock speaks only Anthropic's API for now: its answer is a 404)
$r = ask(path => '/v1/chat/completions', token => $TOKEN);
ok($r->{status} != 401 && $r->{status} != 429,
    'a request of a workspace of 1 rpm goes to the provider');
$r = ask(path => '/v1/chat/completions', token => $TOKEN);
is($r->{status}, 429, 'the next is over the workspace\'s rpm');
is($r->{json}{error}{code}, 'rate_limit_exceeded',
    'as OpenAI\'s rate_limit_exceeded');
ok($r->{headers}{'retry-after'} >= 50, 'with a retry-after');

$r = ask(path => '/v1/responses', token => $TOKEN,
         body => { model => 'gpt-4o-mini', input => 'x' x 2000 });
is($r->{status}, 413, 'a body over client_max_body_size on Responses');
is($r->{json}{error}{type}, 'invalid_request_error',
    'gets OpenAI\'s error object too');

done_testing;
