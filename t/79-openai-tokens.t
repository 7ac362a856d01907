#!/usr/bin/perl

# OpenAI counts input and output tokens against one limit per minute: the
# gateway learns it from x-ratelimit-*-tokens (its reset a Go duration),
# or takes it from tpm=, charges each request its prompt and its
# max_completion_tokens, and keeps a pool within it, alone or with
# another gateway on one Redis, so that the provider never answers 429.
# A project's lower limit beside its org's is the one kept.  A 429 for a
# request too large for its org's limit cools nothing.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;

use Ratepool::Test;

my $a = Ratepool::Test->new;
my $b = Ratepool::Test->new;

my %KEY = map { $_ => "sk-proj-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(k1 k2 c1 p1);
my $TOKEN = 'gw-tokens-' . Ratepool::Test::random_hex(8);

# org-c's limit the provider never tells: the gateway has only tpm=
my $mock = $a->start_mock(port => 1, log => 1, config => {
    keys => { $KEY{k1} => { org => 'org-1', name => 'k1' },
              $KEY{k2} => { org => 'org-2', name => 'k2' },
              $KEY{c1} => { org => 'org-c', name => 'c1' },
              $KEY{p1} => { org => 'org-p', name => 'p1' } },
    orgs => { 'org-1' => { rpm => 1000, tpm => 2000 },
              'org-2' => { rpm => 1000, tpm => 2000 },
              'org-p' => { tpm => 4000, project_tpm => 1000 } } });

my $redis = $a->start_redis;

sub config {
    my ($t, $zone) = @_;

    return <<"EOF";
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m $zone;

    upstream gpt {
        ratepool zone=llm;
        ratepool_key k1 org=org-1 provider=openai
                     server=127.0.0.1:${\ $mock->port } key=$KEY{k1};
        ratepool_key k2 org=org-2 provider=openai
                     server=127.0.0.1:${\ $mock->port } key=$KEY{k2};
    }

    upstream configured {
        ratepool zone=llm;
        ratepool_org org-c tpm=1000;
        ratepool_key c1 org=org-c provider=openai
                     server=127.0.0.1:${\ $mock->port } key=$KEY{c1};
    }

    upstream project {
        ratepool zone=llm;
        ratepool_key p1 org=org-p provider=openai
                     server=127.0.0.1:${\ $mock->port } key=$KEY{p1};
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://gpt;
        }

        location /c/ {
            rewrite ^/c(/.*)\$ \$1 break;
            ratepool_pass http://configured;
        }

        location /p/ {
            rewrite ^/p(/.*)\$ \$1 break;
            ratepool_pass http://project;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF
}

$a->write_config(config($a, ''));
$a->run;

# a short prompt that may answer with 500 tokens, and does
sub chat {
    my ($t, $path, $max, $usage) = @_;
    return $t->http(port => $t->port(0), method => 'POST',
        path => ($path // '') . '/v1/chat/completions',
        headers => [ Authorization => "Bearer $TOKEN",
                     'x-mock-usage' => encode_json($usage
                         // { output_tokens => $max // 500 }) ],
        body => { model => 'gpt-4o-mini',
                  max_completion_tokens => $max // 500,
                  messages => [ { role => 'user', content => 'Hi' } ] });
}

sub provider_statuses { join ',', map { $_->{status} } @{ $mock->log } }

# a request larger than its org's limit: OpenAI says so with a 429, which
# says nothing of the org's other requests

my $TOO_LARGE = { status => 429, body => { error => {
    message => 'Request too large for gpt-4o-mini in organization org-1 on '
             . 'tokens per min (TPM): Limit 2000, Requested 3107. The input '
             . 'or output tokens must be reduced in order to run '
             . 'successfully.',
    type => 'tokens', param => undef, code => 'rate_limit_exceeded' } } };
$mock->script($KEY{$_}, [ $TOO_LARGE ]) for qw(k1 k2);

my $r = chat($a);
like($r->{body}, qr/Request too large for gpt-4o-mini/,
    'a request too large for its org\'s limit gets the provider\'s 429');
is($r->{status}, 429, 'as a 429');
is(scalar @{ $mock->log }, 1, 'without trying the other org, whose limit '
    . 'is the same');
my %state = map { $_->{name} => $_->{state} }
            @{ $a->status->{pools}[0]{keys} };
is_deeply(\%state, { k1 => 'ok', k2 => 'ok' }, 'and cools no org');
$mock->reset;

$r = chat($a);
is($r->{status}, 200, 'the next request is answered');

my $orgs = Ratepool::Test::by_name($a->status->{pools}[0]{orgs});
my $org = $orgs->{ $mock->log->[-1]{org} };

is($org->{learned}{tokens}{limit}, 2000,
    'the limit of all tokens is learned from x-ratelimit-limit-tokens');
is($org->{tpm_limit}, 2000, 'and is the org\'s tokens per minute');
ok($org->{tpm_available} >= 1400 && $org->{tpm_available} <= 1600,
    'of which the 500 answered and the prompt are used '
    . "($org->{tpm_available} left)");
is("$org->{itpm_limit},$org->{otpm_limit}", '0,0',
    'there is no separate limit of input or output tokens');
my $reset = $org->{learned}{tokens}{reset_in_sec};
ok($reset >= 14 && $reset <= 16,
    "its reset, a duration (\"15s\" for 500 of 2000 a minute), is "
    . "learned ($reset s)");
is($org->{learned}{requests}{limit}, 1000,
    'as the request limit is, from x-ratelimit-*-requests');

# two orgs of 2000 tokens a minute hold three answers of 500 tokens and
# a prompt each: five more

my @got = map { chat($a)->{status} } 1 .. 10;
my $ok = grep { $_ == 200 } @got;

is($ok, 5, 'of ten more requests, the orgs had room for five')
    or diag "statuses: @got";
is($got[-1], 429, 'then the gateway answers 429 itself');
unlike(provider_statuses(), qr/429/,
    'and the provider never had to refuse a request');

$r = chat($a);
my $err = eval { decode_json($r->{body}) } || {};
is($err->{error}{code}, 'rate_limit_exceeded',
    'the 429 is OpenAI\'s rate_limit_exceeded');
ok(($r->{headers}{'retry-after'} // 0) >= 1,
    'with a retry-after of when 500 tokens have refilled');

# a configured limit, before the provider says anything; cached prompt
# tokens count, as OpenAI counts a prompt before it looks in its cache

$mock->reset;
@got = map { chat($a, '/c', 400, { input_tokens => 10,
                                   cache_read_input_tokens => 290,
                                   output_tokens => 100 })->{status} } 1 .. 4;
is(join(',', @got), '200,200,429,429',
    'tpm=1000 holds two requests of 400 tokens (290 of them cached), '
    . 'not a third') or diag provider_statuses();
is(scalar @{ $mock->log }, 2, 'the third never reached the provider');

$orgs = Ratepool::Test::by_name($a->status->{pools}[1]{orgs});
is($orgs->{'org-c'}{tpm_configured}, 1000, 'the status shows tpm=');
ok($orgs->{'org-c'}{tpm_available} < 300,
    "and that little is left of it ($orgs->{'org-c'}{tpm_available})");

like($a->http(port => $a->port(0), path => '/ratepool/status?format=prometheus')
     ->{body}, qr/ratepool_org_limit\{[^}]*org="org-c"[^}]*bucket="tpm"\} 1000/,
     'Prometheus names the bucket tpm');

# an OpenAI project's limit, lower than its org's, is the one kept

$mock->reset;
@got = map { chat($a, '/p', 400)->{status} } 1 .. 4;
is(join(',', @got), '200,200,429,429',
    'a project of 1000 tokens a minute, in an org of 4000, holds two '
    . 'answers of 400 tokens') or diag provider_statuses();
unlike(provider_statuses(), qr/429/, 'and the provider refused none');
$orgs = Ratepool::Test::by_name($a->status->{pools}[2]{orgs});
is($orgs->{'org-p'}{learned}{tokens}{limit}, 1000,
    'the project\'s limit is learned from x-ratelimit-*-project-tokens');

$a->stop;

# two gateways on one Redis share the one limit

my $zone = 'redis=127.0.0.1:' . $redis->port . ' redis_timeout=200ms';

$a->write_config(config($a, $zone));
$b->write_config(config($b, $zone));
$a->run;
$b->run;
$mock->reset;

@got = map { chat($_, '/c', 300)->{status} } $a, $b, $a, $b, $a, $b;
$ok = grep { $_ == 200 } @got;


is($ok, 3, 'tpm=1000 holds three answers of 300 tokens across two '
    . 'gateways') or diag "statuses: @got";
is(scalar @{ $mock->log }, 3, 'only those reached the provider');

$a->stop;
$b->stop;

done_testing;
