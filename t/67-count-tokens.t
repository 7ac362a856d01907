#!/usr/bin/perl

# Counting tokens (POST /v1/messages/count_tokens) is free, and the
# provider limits it apart from messages: it takes nothing of an org's or
# a workspace's per-minute buckets, its answer is passed on as it came,
# and a 429 it gets cools nothing that messages use.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(c1 c2);
my $TOKEN = 'gw-ci-' . Ratepool::Test::random_hex(8);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $KEY{c1} => { org => 'org-1', name => 'c1' },
        $KEY{c2} => { org => 'org-2', name => 'c2' },
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
        ratepool_org org-1 rpm=5 itpm=10000;
        ratepool_org org-2 rpm=5 itpm=10000;
        ratepool_key c1 org=org-1 server=127.0.0.1:%%PORT_1%% key=$KEY{c1};
        ratepool_key c2 org=org-2 server=127.0.0.1:%%PORT_1%% key=$KEY{c2};
    }

    ratepool_workspace ci rpm=3 itpm=2000 daily_tokens=100;
    ratepool_client ci ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            access_log off;
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub count {
    my (%opt) = @_;
    return $t->messages(token => $TOKEN, path => '/v1/messages/count_tokens',
                        body => { model => 'claude-sonnet-4-6',
                                  messages => [ { role => 'user',
                                                  content => 'x' x 4000 } ] },
                        %opt);
}

sub orgs { Ratepool::Test::by_name($t->status->{pools}[0]{orgs}) }

my $before = $t->status;
my @statuses = map { count()->{status} } 1 .. 12;
my $after = $t->status;

is_deeply(\@statuses, [ (200) x 12 ],
    'twelve counts, four times what the workspace may send a minute, and '
    . 'over what both orgs may');

my ($wb, $wa) = map { $_->{workspaces}[0] } $before, $after;
is($wa->{rpm_available}, $wb->{rpm_available},
   'the workspace\'s requests are untouched');
is($wa->{tokens_today}, 0, 'its daily budget too, though each counted '
   . 'about 1,000 tokens');
is($wa->{reserved_input_tokens}, 0, 'nothing is held for them');

for my $name (qw(org-1 org-2)) {
    my ($ob, $oa) = map { Ratepool::Test::by_name($_->{pools}[0]{orgs})
                          ->{$name} } $before, $after;
    is($oa->{rpm_available}, $ob->{rpm_available},
       "${name}'s requests are untouched");
    is($oa->{itpm_available}, $ob->{itpm_available},
       "${name}'s input tokens too");
}

my $r = count();
my $body = eval { decode_json($r->{body}) } || {};
cmp_ok($body->{input_tokens} // 0, '>', 900,
    'the count reaches the client as the provider gave it');

# a 429 for counting is the count's limit, not the messages'

$mock->reset;
$mock->script($KEY{c1}, [ { status => 429, retry_after => '30' } ]);
$mock->script($KEY{c2}, [ { status => 429, retry_after => '30' } ]);

$r = count();
is($r->{status}, 429, 'both keys refuse a count: the client gets the 429');
is(scalar @{ $mock->log }, 2, 'after it went to both');

my $keys = Ratepool::Test::by_name($t->status->{pools}[0]{keys});
is_deeply([ map { $keys->{$_}{state} } qw(c1 c2) ], [ 'ok', 'ok' ],
    'neither key cools down');
is($t->messages(token => $TOKEN)->{status}, 200,
   'and a message goes at once');

like($t->error_log, qr/key "c\d" got 429 counting tokens/,
     'the log says what was refused');

$t->check_log;

done_testing;
