#!/usr/bin/perl

# Input and output tokens per minute, charged from the usage the provider
# reports: an org that used up its output tokens is skipped until its
# bucket refills, a workspace over its tokens per minute waits with its
# own retry-after, and cache reads do not count as input tokens.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(a1 b1 w1);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(route out in);

# the mock reports no limits: the gateway has only its configuration
my $mock = $t->start_mock(port => 1, config => {
    keys => {
        $KEY{a1} => { org => 'org-a', name => 'a1' },
        $KEY{b1} => { org => 'org-b', name => 'b1' },
        $KEY{w1} => { org => 'org-w', name => 'w1' },
    },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-a otpm=1000;
        ratepool_org org-b otpm=1000;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%% key=$KEY{a1};
        ratepool_key b1 org=org-b server=127.0.0.1:%%PORT_1%% key=$KEY{b1};
    }

    upstream solo {
        ratepool zone=llm;
        ratepool_key w1 org=org-w server=127.0.0.1:%%PORT_1%% key=$KEY{w1};
    }

    ratepool_workspace route;
    ratepool_workspace out otpm=600;
    ratepool_workspace in itpm=1000;
    ratepool_client route ${\ $t->token_hash($TOKEN{route})};
    ratepool_client out ${\ $t->token_hash($TOKEN{out})};
    ratepool_client in ${\ $t->token_hash($TOKEN{in})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location /solo/v1/ {
            rewrite ^/solo(/.*)\$ \$1 break;
            ratepool_pass http://solo;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub ask {
    my ($who, $path, %usage) = @_;
    return $t->messages(token => $TOKEN{$who}, path => $path,
                        headers => [ 'x-mock-usage' => encode_json(\%usage) ]);
}

sub names { [ map { $_->{key_name} } @{ $mock->log } ] }

# an org that used its output tokens is skipped until they refill

is(ask('route', '/v1/messages', input_tokens => 10, output_tokens => 1500)
   ->{status}, 200, 'an answer of 1500 output tokens, over org-a\'s 1000');
is_deeply(names(), [ 'a1' ], 'came from org-a');

$mock->reset;
my @got = map {
    ask('route', '/v1/messages', input_tokens => 10, output_tokens => 50)
    ->{status} } 1 .. 4;

is(join(',', @got), '200,200,200,200', 'the next requests are answered');
is_deeply(names(), [ ('b1') x 4 ],
    'all by org-b, while org-a repays its output tokens');

my $s = $t->status;
my $orgs = Ratepool::Test::by_name($s->{pools}[0]{orgs});
is($orgs->{'org-a'}{otpm_limit}, 1000, 'the status shows org-a\'s limit');
is($orgs->{'org-a'}{otpm_available}, 0, 'and nothing left of it');
ok($orgs->{'org-b'}{otpm_available} >= 800
   && $orgs->{'org-b'}{otpm_available} < 900,
   'org-b has its 1000 less the 200 it answered, and what refilled since')
    or diag "org-b otpm_available: $orgs->{'org-b'}{otpm_available}";
is(Ratepool::Test::by_name($s->{pools}[0]{keys})->{a1}{state}, 'limited',
    'a1 shows as limited');

# a workspace over its output tokens per minute

is(ask('out', '/solo/v1/messages', output_tokens => 900)->{status}, 200,
    'a workspace of 600 output tokens a minute gets an answer of 900');

my $r = ask('out', '/solo/v1/messages', output_tokens => 1);
my $err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 429, 'its next request waits for the debt to be repaid');
like($err->{error}{message},
    qr/workspace "out" is over its budget of 600 output tokens per minute/,
    'naming the budget');
ok($r->{headers}{'retry-after'} >= 36 && $r->{headers}{'retry-after'} <= 40,
    'retry-after is when the debt of 300 and the 64 output tokens the '
    . 'request reserves have refilled at 10 a second')
    or diag "retry-after: $r->{headers}{'retry-after'}";

# cache reads are not input tokens per minute; cache writes are

is(ask('in', '/solo/v1/messages', input_tokens => 100,
       cache_read_input_tokens => 50000, cache_creation_input_tokens => 50,
       output_tokens => 1)->{status}, 200,
    'a request that read 50000 tokens from the cache');
is(ask('in', '/solo/v1/messages', input_tokens => 1500, output_tokens => 1)
   ->{status}, 200, 'is charged 150 input tokens, so the next is admitted');

$r = ask('in', '/solo/v1/messages', input_tokens => 1, output_tokens => 1);
$err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 429, 'which used 1500: the one after waits');
like($err->{error}{message}, qr/1000 input tokens per minute/,
    'for input tokens');

# OpenAI's headers: counts, and a reset as a duration

$mock->script($KEY{w1}, [ { status => 200, headers => {
    'x-ratelimit-limit-requests'     => 77,
    'x-ratelimit-remaining-requests' => 70,
    'x-ratelimit-reset-requests'     => '6m0s',
} } ]);
is(ask('route', '/solo/v1/messages', output_tokens => 1)->{status}, 200,
    'an answer with OpenAI\'s rate limit headers');

my $w = Ratepool::Test::by_name($t->status->{pools}[1]{orgs})->{'org-w'};
is($w->{rpm_limit}, 77, 'teaches the limit of requests');
ok($w->{rpm_available} <= 70, 'and what is left of it');
ok($w->{learned}{requests}{reset_in_sec} >= 358
   && $w->{learned}{requests}{reset_in_sec} <= 360,
   'and when it resets, read from "6m0s"')
    or diag explain $w->{learned};

$t->stop;
$t->check_log;

done_testing;
